"""Continuous batching on a real engine: prefill-first scheduling and preemption by recompute keep
outputs exact. (The schedulers' policies alone, without a model: test_scheduling_policy.py.)"""

from collections import deque

import torch

from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.scheduler import AbortOutcome, BatchScheduler, take_prefill_batch
from services.engine.sequence import Sequence
from services.tiny_models import get_model


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 1024, (int(torch.randint(4, 60, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def _step(scheduler, engine):
    plan = scheduler.schedule()
    if plan is not None:
        engine.run(plan)
        scheduler.finish_step(plan)


def _run(scheduler, engine, seqs):
    for s in seqs:
        scheduler.add_prompt(s)
    steps = 0
    while scheduler.has_work():
        _step(scheduler, engine)
        steps += 1
        assert steps < 10_000
    return {s.seq_id: s.output_token_ids for s in seqs}


def test_preemption_under_memory_pressure_gives_the_same_tokens():
    model = get_model("llama")
    params = [
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
    ]
    prompts = _prompts(12)

    def seqs():
        return [Sequence.from_prompt(str(i), p, params[i % 2]) for i, p in enumerate(prompts)]

    roomy = Engine(model, EngineConfig(kv_cache_bytes=16 << 20))
    expected = _run(BatchScheduler(roomy.block_manager, 64, 4096), roomy, seqs())

    # 12 sequences of up to ~100 tokens need ~80 blocks of 16; give the engine 40
    block_bytes = roomy.kv_pool.layout.block_bytes
    tight = Engine(model, EngineConfig(kv_cache_bytes=block_bytes * 41, max_model_len=256))
    scheduler = BatchScheduler(tight.block_manager, 64, 4096)
    got = _run(scheduler, tight, seqs())
    assert scheduler.num_preemptions > 0
    assert got == expected
    assert tight.block_manager.num_free == tight.block_manager.num_blocks


def test_prefill_batch_respects_token_budget_and_fcfs():
    engine = Engine(get_model("llama"), EngineConfig(kv_cache_bytes=4 << 20))
    sp = SamplingParams(max_tokens=2)
    waiting = deque(Sequence.from_prompt(str(i), [5] * n, sp) for i, n in enumerate([30, 30, 50, 10]))
    batch = take_prefill_batch(waiting, engine.block_manager, max_tokens=64, max_seqs=8)
    assert [s.seq_id for s in batch] == ["0", "1"]  # the third would exceed 64 tokens; no skipping ahead
    lone = deque([Sequence.from_prompt("big", [5] * 200, sp)])
    assert len(take_prefill_batch(lone, engine.block_manager, max_tokens=64, max_seqs=8)) == 1  # alone, over budget


def test_abort_frees_blocks_wherever_the_sequence_is():
    engine = Engine(get_model("llama"), EngineConfig(kv_cache_bytes=4 << 20))
    scheduler = BatchScheduler(engine.block_manager, 8, 512)
    a = Sequence.from_prompt("a", [7] * 20, SamplingParams(max_tokens=50, ignore_eos=True))
    b = Sequence.from_prompt("b", [8] * 20, SamplingParams(max_tokens=50, ignore_eos=True))
    c = Sequence.from_prompt("c", [9] * 20, SamplingParams(max_tokens=50, ignore_eos=True))
    scheduler.add_prompt(a)
    _step(scheduler, engine)  # a runs
    scheduler.add_prompt(b)  # b waits
    assert [scheduler.abort(s) for s in (a, b, c)] == [AbortOutcome.FREED, AbortOutcome.FREED, AbortOutcome.NOT_QUEUED]
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert not scheduler.has_work()
