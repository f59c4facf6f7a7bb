"""Sampling: reproducible per seed whatever the batch, and faithful to the distribution."""

import math

import pytest
import torch

from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.sampler import greedy_tokens, sample, uniform_noise
from services.engine.sequence import Sequence
from services.tiny_models import get_model


@pytest.fixture(scope="module")
def engine():
    eng = Engine(get_model("llama"), EngineConfig(kv_cache_bytes=8 << 20))
    yield eng
    eng.close()


def _generate(engine, batch: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[int]]:
    seqs = [Sequence.from_prompt(i, p, sp) for i, p, sp in batch]
    engine.prefill(seqs)
    running = [s for s in seqs if not s.finished]
    while running:
        engine.decode_step(running)
        running = [s for s in running if not s.finished]
    for s in seqs:
        engine.free(s)
    return {s.seq_id: s.output_token_ids for s in seqs}


PROMPT = [5, 77, 301, 12, 9, 400, 88]
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=100, seed=1234, ignore_eos=True)


def test_seeded_sampling_is_reproducible_across_runs_and_batches(engine):
    alone = _generate(engine, [("x", PROMPT, SEEDED)])["x"]
    again = _generate(engine, [("x", PROMPT, SEEDED)])["x"]
    others = [(f"o{i}", [i + 3] * (i + 2), SamplingParams(max_tokens=5 + i, temperature=1.0, seed=i)) for i in range(6)]
    in_batch_first = _generate(engine, [("x", PROMPT, SEEDED)] + others)["x"]
    in_batch_last = _generate(engine, others[::-1] + [("x", PROMPT, SEEDED)])["x"]
    assert alone == again == in_batch_first == in_batch_last
    # and the seed matters: another seed gives another continuation
    other_seed = SamplingParams(**{**SEEDED.__dict__, "seed": 99})
    assert _generate(engine, [("x", PROMPT, other_seed)])["x"] != alone


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    tokens = torch.tensor(sample(logits, params, [0] * 4000).token_ids)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    # 4 sigma of a binomial proportion with n=4000 is below 0.032
    assert torch.allclose(freq, probs, atol=0.032), freq


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    top_k = [SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(500)]
    assert set(sample(logits, top_k, [0] * 500).token_ids) == {0, 1}
    # softmax mass: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps the first two tokens only
    top_p = [SamplingParams(temperature=1.0, top_p=0.8, seed=s) for s in range(500)]
    assert set(sample(logits, top_p, [0] * 500).token_ids) == {0, 1}


def test_greedy_and_logprob_of_chosen_token():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    result = sample(logits, [SamplingParams(temperature=0, logprobs=True)] * 2, [0, 0])
    assert result.token_ids == [1, 0]
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 0]]
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(result.logprobs, expected.tolist()))
    # logprobs are opt-in per row; a random row's logprob is that of the token it drew
    mixed = sample(
        logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3, logprobs=True)], [0, 0]
    )
    assert math.isnan(mixed.logprobs[0])
    assert math.isclose(mixed.logprobs[1], torch.log_softmax(logits[1], -1)[mixed.token_ids[1]].item(), rel_tol=1e-6)


@pytest.mark.parametrize("vocab", [50, 300, 1000, 32000, 32001])
def test_greedy_tokens_equal_argmax_including_ties(vocab):
    g = torch.Generator().manual_seed(vocab)
    for _ in range(10):
        logits = torch.randn(16, vocab, generator=g)
        logits[3, vocab // 2] = logits[3].max() + 1
        logits[3, vocab - 1] = logits[3, vocab // 2]  # a tie: the first index wins
        logits[5] = 0.0  # all equal
        logits[7, -1] = 100.0  # in the short last chunk
        assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


def test_noise_is_uniform_and_depends_on_seed_and_step():
    u = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 20000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


def test_stop_tokens_and_max_tokens(engine):
    free = _generate(engine, [("g", PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])["g"]
    stop_at = free[4]
    stopped = Sequence.from_prompt("s", PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,)))
    engine.prefill([stopped])
    while not stopped.finished:
        engine.decode_step([stopped])
    engine.free(stopped)
    assert stopped.output_token_ids == free[: free.index(stop_at) + 1]
    assert stopped.finish_reason == "stop"
    assert len(free) == 12
