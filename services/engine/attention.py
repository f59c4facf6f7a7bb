"""Attention over the paged KV pool.

Two paths with one interface:
- the torch reference path (CPU, tests, CUDA without Triton): prefill runs causal SDPA per packed
  prompt; decode gathers each sequence's blocks into a padded tensor and masks past its length.
- the Triton path (CUDA): decode reads blocks in place (triton_attention.py), no gather copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """What one forward pass needs to know about its batch.

    Prefill: `cu_seqlens` are the prompt boundaries in the packed token dimension (Python ints, so
    the per-prompt loop does not synchronise with the device).
    Decode: one query token per sequence; `block_tables` [B, max_blocks] and `context_lens` [B]
    (tokens in cache, including the one being written this step).
    `slot_mapping` [T] is where each token's K/V is written: block * block_size + row.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    cu_seqlens: list[int] | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    max_context_len: int = 0
    use_triton: bool = False
    kv_mirror: object | None = None  # DecodeKvMirror for CPU decode (cpu_kv_mirror.py)
    context_lens_list: list[int] | None = None
    # Computed once per forward pass rather than in every layer (each is a few small ops, which
    # on CPU add up to a noticeable share of a decode step):
    slot_blocks: torch.Tensor | None = None  # slot_mapping // block_size
    slot_rows: torch.Tensor | None = None  # slot_mapping % block_size
    cos: torch.Tensor | None = None  # RoPE for each token, in the model dtype
    sin: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, span]: context positions each query may see


def slot_indices(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    return blocks, slot_mapping - blocks * block_size


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             blocks: torch.Tensor, rows: torch.Tensor) -> None:
    """Scatters K/V of T tokens [T, kv_heads, head_dim] into (block, row) slots."""
    k_cache.index_put_((blocks, rows), k)
    v_cache.index_put_((blocks, rows), v)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float) -> torch.Tensor:
    """Causal attention within each packed prompt. q [T, H, D], k/v [T, KVH, D] -> [T, H, D]."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qi = q[start:end].transpose(0, 1).unsqueeze(0)
        ki = k[start:end].transpose(0, 1).unsqueeze(0)
        vi = v[start:end].transpose(0, 1).unsqueeze(0)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa)
        out[start:end] = oi.squeeze(0).transpose(0, 1)
    return out


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its paged context. q [B, H, D] -> [B, H, D].

    The blocks are gathered with index_select along the block dimension of a head-major view of
    the pool, so the result is already [KVH, B, S, D] with each [S, D] matrix contiguous, which
    SDPA reads without another copy (advanced indexing, or gathering in the pool's own order and
    permuting, costs two to six times more on CPU)."""
    batch, _, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-max_context_len // block_size)
    flat_blocks = block_tables[:, :num_blocks].reshape(-1).long()
    span = num_blocks * block_size

    def gather(cache):  # [NB, BS, KVH, D] -> [B, KVH, span, D]
        # The leading unit dimension is deliberate: torch 2.13's index_select takes a ~15x slower
        # path for this 4-D strided view than for the same data viewed in 5-D.
        g = torch.index_select(cache.permute(2, 0, 1, 3).unsqueeze(0), 2, flat_blocks)
        return g.view(kv_heads, batch, span, head_dim).transpose(0, 1)

    return dense_decode_attention(q, gather(k_cache), gather(v_cache), context_mask(context_lens, span), scale)


def context_mask(context_lens: torch.Tensor, span: int) -> torch.Tensor:
    """[B, 1, 1, span]: True where a position is inside the sequence's context."""
    positions = torch.arange(span, device=context_lens.device)
    return (positions[None, :] < context_lens[:, None]).view(-1, 1, 1, span)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """q [B, H, D] against k/v [B, KVH, span, D]; mask [B, 1, 1, span] marks the valid positions."""
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.squeeze(2)
