"""The emulated engine (services/engine/emulated.py): steps last what the latency profile says,
tokens are a deterministic function of the request, the KV pool has the profile's capacity at the
stated scale, and a pull's floor is the profile's transfer time for the unscaled bytes."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from services.common.latency_profile import DecodeLatency, LatencyProfile, PrefillLatency, TransferSpec
from services.engine.config import EngineConfig, SamplingParams
from services.engine.emulated import EmulatedEngine, emulated_token, prompt_hash
from services.engine.scheduler import BatchScheduler
from services.engine.sequence import Sequence
from services.tiny_models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Long enough steps that timer and scheduling noise are a small part of them.
PROFILE = LatencyProfile(
    prefill=PrefillLatency(a=0.020, b=50e-6, c=0.0),
    decode=DecodeLatency(a=0.015, b=1e-6, c=200e-6),
    kv_bytes_per_token=131072,
    kv_capacity_tokens=16 * 4000,
    block_size=16,
    max_batched_tokens=2048,
    max_num_seqs=64,
    transfer=TransferSpec(fixed_s=0.001, bytes_per_s=50e9),
    model="llama-3-8b",
    device="H100-80G",
    source="analytic",
)


@pytest.fixture(scope="module")
def engine():
    engine = EmulatedEngine(get_model("llama"), EngineConfig(device="emulated"), PROFILE, kv_scale=4096)
    yield engine
    engine.close()


def _seq(name: str, n: int, max_tokens: int = 8, **sampling) -> Sequence:
    return Sequence.from_prompt(
        name, [5 + i % 500 for i in range(n)], SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    )


def _timed(fn, *args) -> float:
    started = time.monotonic()
    fn(*args)
    return time.monotonic() - started


def test_steps_last_what_the_profile_says(engine):
    seqs = [_seq("a", 100), _seq("b", 300)]
    prefill = _timed(engine.prefill, seqs)
    expected = PROFILE.prefill.time([100, 300])  # 40 ms
    assert expected <= prefill <= expected * 1.1 + 0.002
    decode = _timed(engine.decode_step, seqs)
    expected = PROFILE.decode.step_time(2, 101 + 301 + 2)  # the contexts including the token fed
    assert expected <= decode <= expected * 1.1 + 0.002
    for seq in seqs:
        engine.free(seq)


def test_tokens_are_a_function_of_the_request_never_an_eos(engine):
    vocab, eos = engine.model_config.vocab_size, engine.model_config.eos_token_ids
    greedy = [_seq("g1", 40, max_tokens=50, seed=1), _seq("g2", 40, max_tokens=50, seed=2)]
    sampled = [
        _seq("s1", 40, max_tokens=50, temperature=1.0, seed=1),
        _seq("s2", 40, max_tokens=50, temperature=1.0, seed=2),
    ]
    scheduler = BatchScheduler(engine.block_manager, 8, 4096)
    for seq in greedy + sampled:
        scheduler.add_prompt(seq)
    while scheduler.has_work():
        plan = scheduler.schedule()
        assert plan is not None
        engine.run(plan)
        scheduler.finish_step(plan)
    key = prompt_hash(greedy[0].token_ids[:40])
    assert greedy[0].output_token_ids == [emulated_token(key, i, 0, vocab, eos) for i in range(50)]
    assert greedy[0].output_token_ids == greedy[1].output_token_ids  # greedy: the seed does not matter
    assert sampled[0].output_token_ids == [emulated_token(key, i, 1, vocab, eos) for i in range(50)]
    assert sampled[0].output_token_ids != sampled[1].output_token_ids
    assert all(seq.finish_reason == "length" for seq in greedy + sampled)  # never an EOS
    assert not {t for seq in greedy + sampled for t in seq.output_token_ids} & set(eos)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_a_resumed_request_continues_the_same_stream(engine):
    """After a failover the request is re-prefilled with its tokens so far: the rest of the stream
    is the one the first worker would have made."""
    whole = _seq("whole", 30, max_tokens=12)
    engine.prefill([whole])
    while not whole.finished:
        engine.decode_step([whole])
    resumed = Sequence(
        seq_id="resumed", token_ids=whole.token_ids[: 30 + 5], num_prompt_tokens=30, sampling=whole.sampling
    )
    engine.prefill([resumed])
    while not resumed.finished:
        engine.decode_step([resumed])
    assert resumed.output_token_ids == whole.output_token_ids
    engine.free(whole)
    engine.free(resumed)


def test_kv_capacity_scale_and_transfer_floor(engine):
    layout = engine.kv_pool.layout
    assert engine.block_manager.num_blocks == layout.num_blocks == 4000  # the profile's capacity
    assert layout.block_bytes == 16 * 131072 // 4096  # bytes per token scaled by 1/4096
    assert engine.config.max_num_seqs == 64 and engine.config.max_num_batched_tokens == 2048
    assert engine.min_transfer_seconds(512) == pytest.approx(0.001 + 512 * 131072 / 50e9)


def test_a_chunked_prefill_step_lasts_the_profiles_mixed_step_time_and_gives_the_same_tokens(engine):
    running, prompt = _seq("r", 50, max_tokens=20), _seq("p", 600, max_tokens=20)
    engine.prefill([running])
    # the prompt's first 500 tokens beside the running sequence's next token, then the last 100
    first = _timed(engine.mixed_step, [running, prompt], [1, 500])
    expected = PROFILE.mixed_step_time([(0, 500)], [51])
    assert expected <= first <= expected * 1.1 + 0.002
    assert prompt.num_cached == 500 and not prompt.output_token_ids  # no token until its last chunk
    second = _timed(engine.mixed_step, [running, prompt], [1, 100])
    expected = PROFILE.mixed_step_time([(500, 100)], [52])
    assert expected <= second <= expected * 1.1 + 0.002
    whole = _seq("p", 600, max_tokens=20)
    engine.prefill([whole])
    assert prompt.output_token_ids == whole.output_token_ids and len(running.output_token_ids) == 3
    for seq in (running, prompt, whole):
        engine.free(seq)


def test_the_mixed_step_model_meets_the_prefill_and_decode_models_at_their_ends():
    # a first chunk alone, where prefill is compute-bound, is a prefill of that many tokens
    assert PROFILE.mixed_step_time([(0, 1000)], []) == pytest.approx(PROFILE.prefill.time([1000]))
    # a later chunk pays attention over the earlier tokens: its part of a whole prompt's quadratic term
    p = PrefillLatency(a=0.02, b=50e-6, c=1e-8)
    quadratic = LatencyProfile(**{**PROFILE.__dict__, "prefill": p})
    halves = quadratic.mixed_step_time([(0, 1000)], []) + quadratic.mixed_step_time([(1000, 1000)], [])
    assert halves == pytest.approx(p.time([2000]) + p.a)  # two passes: the fixed cost twice
    # next tokens beside a small chunk: never less than their decode step alone (on an H100 the
    # weights' read dominates a step of 20 tokens)
    contexts = [300, 500] * 8
    h100 = LatencyProfile.load(os.path.join(ROOT, "profiles", "llama-3-8b-H100-80G-analytic.json"))
    assert h100.mixed_step_time([(0, 4)], contexts) == pytest.approx(h100.decode.step_time(16, sum(contexts)))
    assert PROFILE.mixed_step_time([(0, 4)], contexts) > PROFILE.decode.step_time(16, sum(contexts))
    # ... and beside a large one, each adds a prefill token's work and its context's reads
    with_chunk = PROFILE.mixed_step_time([(0, 1000)], contexts)
    assert with_chunk == pytest.approx(PROFILE.prefill.time([1016]) + PROFILE.decode.b * sum(contexts))


def test_instances_of_other_parallelism_or_gpus_can_hand_kv_to_each_other(engine):
    # DistServe's point: each phase picks its own parallelism (and may run on other GPUs); the
    # plan search does, and `pdserve up --plan` must be able to start what it chose.
    other = replace(PROFILE, tensor_parallel=2, pipeline_parallel=2, device="H200")
    decode = EmulatedEngine(get_model("llama"), EngineConfig(device="emulated"), other, kv_scale=4096)
    try:
        assert decode.kv_pool.layout.fingerprint() == engine.kv_pool.layout.fingerprint()
    finally:
        decode.close()
    rescaled = EmulatedEngine(get_model("llama"), EngineConfig(device="emulated"), PROFILE, kv_scale=1024)
    try:
        assert rescaled.kv_pool.layout.fingerprint() != engine.kv_pool.layout.fingerprint()
    finally:
        rescaled.close()


def test_a_pipelined_decode_step_advances_every_sequence_in_one_micro_batchs_time():
    # pp micro-batches in flight, each a pp-th of the running sequences (the simulator's lanes)
    profile = replace(PROFILE, pipeline_parallel=2, decode=DecodeLatency(a=0.015, b=20e-6, c=5e-3))
    engine = EmulatedEngine(get_model("llama"), EngineConfig(device="emulated"), profile, kv_scale=4096)
    try:
        assert engine.config.max_num_seqs == 2 * PROFILE.max_num_seqs
        seqs = [_seq(f"s{i}", 100) for i in range(4)]
        engine.prefill(seqs)
        context = sum(len(s.token_ids) for s in seqs)
        step = _timed(engine.decode_step, seqs)
        expected = profile.decode.step_time(2, context / 2)  # 2 sequences' step, not 4
        assert expected <= step <= expected * 1.1 + 0.002
        assert profile.decode.step_time(4, context) > expected * 1.2  # the test tells them apart
    finally:
        engine.close()


def test_steps_that_run_past_the_profile_are_counted_late(engine):
    seqs = [_seq("late", 50)]
    engine.prefill(seqs)
    steps, late, late_seconds = engine.steps, engine.late_steps, engine.late_seconds
    engine.decode_step(seqs)  # on time: its own work is a hash
    assert engine.steps == steps + 1
    step = PROFILE.decode.step_time(1, 52)
    real_tokens = engine._tokens
    # a step whose own work takes longer than the profile's time: the cores were too busy
    engine._tokens = lambda s: (time.sleep(step + 0.010), real_tokens(s))[1]
    try:
        engine.decode_step(seqs)
    finally:
        engine._tokens = real_tokens
    assert engine.late_steps >= late + 1
    assert engine.late_seconds - late_seconds >= 0.010
    engine.free(seqs[0])
