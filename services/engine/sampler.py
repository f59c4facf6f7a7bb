"""Batched sampling whose randomness depends only on (request seed, output index, token id).

Random rows draw with the exponential-race form of Gumbel-max: token = argmax(p / E), E ~ Exp(1).
E comes from a counter-based hash of (seed, step, token id) rather than a stateful generator, so a
request's tokens are the same whatever batch it ran in and whichever worker (prefill or decode)
sampled each token: the first token in prefill and the rest in decode use the same stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SamplingParams

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 tensors holding uint32 values (int64 products wrap mod 2^64)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0,1) [B, V] from int64 seeds [B] and output indices [B]."""
    device = seeds.device
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _fmix32(_fmix32(seed_lo ^ _fmix32(seed_hi + 0x9E3779B9)) ^ (steps & _MASK32))
    cols = torch.arange(vocab_size, device=device, dtype=torch.int64)
    h = _fmix32((row[:, None] + cols[None, :] * 0x9E3779B1) & _MASK32)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> SampleResult:
    """logits [B, V] (any float dtype); steps[i] is the index of the output token being sampled.
    Logprobs are computed only for rows whose params ask for them (NaN elsewhere): the log-sum-exp
    over the vocabulary is a noticeable share of a small model's decode step on CPU (docs/engine.md)."""
    logits = logits.float()
    tokens = greedy_tokens(logits)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        tokens[idx] = _sample_random(logits[idx], [params[i] for i in random_rows], [steps[i] for i in random_rows])
    logprobs = [math.nan] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if wanted:
        idx = torch.tensor(wanted, device=logits.device)
        rows = logits[idx]
        # log_softmax at the chosen token, without materialising the whole log-softmax
        chosen = rows.gather(1, tokens[idx, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
        for i, value in zip(wanted, chosen.tolist()):
            logprobs[i] = value
    return SampleResult(tokens.tolist(), logprobs)


def greedy_tokens(logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """argmax over the last dim (first index of the maximum, as torch.argmax).

    On CPU torch's index-returning reductions (argmax, max(dim)) are not vectorised, an order of
    magnitude slower than amax (docs/engine.md). So: the maximum of each chunk of `chunk` columns
    (vectorised), the first chunk holding the row maximum, and argmax inside that chunk only."""
    rows, vocab = logits.shape
    if logits.is_cuda or vocab <= 2 * chunk:
        return logits.argmax(dim=-1)
    whole = vocab - vocab % chunk
    chunk_max = logits[:, :whole].view(rows, whole // chunk, chunk).amax(dim=-1)
    if whole < vocab:  # the short last chunk
        chunk_max = torch.cat([chunk_max, logits[:, whole:].amax(dim=-1, keepdim=True)], dim=1)
    starts = chunk_max.argmax(dim=-1) * chunk
    # a short last chunk's window repeats its last column: a later duplicate never wins argmax
    columns = (starts[:, None] + torch.arange(chunk, device=logits.device)).clamp_(max=vocab - 1)
    return starts + logits.gather(1, columns).argmax(dim=-1)


def _sample_random(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temps
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        drop = ranks >= torch.tensor(top_k, device=device)[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    seeds = torch.tensor([p.seed & ((1 << 63) - 1) for p in params], device=device, dtype=torch.int64)
    exp_noise = -torch.log(uniform_noise(seeds, torch.tensor(steps, device=device, dtype=torch.int64), vocab))
    return (probs / exp_noise).argmax(dim=-1)
