"""The workers' scheduling policies (services/engine/scheduler.py) through their public methods,
on a real block manager: decode admission with pulls in flight and quarantine, prefill batching
from one queue, and what aborting a request does wherever it is. Steps that need tokens run on a
real (tiny) engine; a KV pull is taken to have succeeded or failed as each test says (the kvstore
transfers themselves are tested in tests/integration and tests/e2e)."""

from __future__ import annotations

import pytest

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.scheduler import (
    AbortOutcome,
    BatchScheduler,
    DecodeScheduler,
    PrefillScheduler,
    StepKind,
)
from services.engine.sequence import Sequence, SequenceStatus
from services.tiny_models import get_model

BLOCK = 16


def _seq(name: str, context: int, max_tokens: int = 4) -> Sequence:
    """A request as a decode worker receives it: `context` tokens, the last one still to be fed."""
    tokens = [5 + i % 50 for i in range(context)]
    return Sequence(
        seq_id=name,
        token_ids=tokens,
        num_prompt_tokens=context - 1,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )


@pytest.fixture(scope="module")
def model_dir():
    return get_model("llama")


def _engine(model_dir, num_blocks: int, max_model_len: int) -> Engine:
    """An engine whose block manager has exactly `num_blocks` usable blocks (one more is the null block)."""
    probe = Engine(model_dir, EngineConfig(kv_cache_bytes=1 << 20, max_model_len=max_model_len))
    block_bytes = probe.kv_pool.layout.block_bytes
    probe.close()
    return Engine(model_dir, EngineConfig(kv_cache_bytes=(num_blocks + 1) * block_bytes, max_model_len=max_model_len))


def _step(scheduler, engine: Engine) -> list[Sequence]:
    """What the decode worker's engine thread does: admit (the pulls succeed at once), then one step.
    Returns the sequences admitted."""
    admitted = scheduler.admit() if isinstance(scheduler, DecodeScheduler) else []
    for seq in admitted:
        scheduler.pull_succeeded(seq)
    plan = scheduler.schedule()
    if plan is not None:
        engine.run(plan)
        scheduler.finish_step(plan)
    return admitted


# ---- decode admission -------------------------------------------------------------------------------
def test_an_idle_worker_admits_a_request_that_needs_its_whole_pool():
    """The watermark is kept only while others hold blocks: a request needing every block waits for
    nothing on an idle worker, and the next one waits until the pool is free again."""
    blocks = BlockManager(64, BLOCK)
    scheduler = DecodeScheduler(blocks, max_num_seqs=64, max_num_batched_tokens=8192)
    assert scheduler.watermark_blocks >= 1
    long, short = _seq("long", 1023), _seq("short", 10)
    scheduler.add_request(long)
    scheduler.add_request(short)
    assert scheduler.admit() == [long] and long.status is SequenceStatus.PULLING
    assert len(long.block_table) == 64 and blocks.num_free == 0  # 1022 cached tokens + room for the next
    assert scheduler.admit() == [] and scheduler.fits(short) is False
    scheduler.pull_succeeded(long)
    assert long.status is SequenceStatus.RUNNING and long.num_cached == 1022
    assert scheduler.abort(long) is AbortOutcome.FREED and blocks.num_free == 64
    assert scheduler.admit() == [short]


def test_admission_is_fcfs_keeps_a_watermark_and_counts_pulls_in_flight():
    blocks = BlockManager(20, BLOCK)
    scheduler = DecodeScheduler(blocks, max_num_seqs=2, max_num_batched_tokens=8192)
    first, big, small = _seq("first", 100), _seq("big", 200), _seq("small", 5)
    for seq in (first, big, small):
        scheduler.add_request(seq)
    assert scheduler.admission_blocks == 7 + 13 + 1  # what routers see promised
    # first takes 7 blocks; big needs 13 + the watermark of 1 > 13 free: it waits, and small,
    # which would fit, waits behind it (no skipping ahead)
    assert scheduler.admit() == [first] and blocks.num_free == 13
    assert scheduler.admit() == [] and scheduler.admission_blocks == 13 + 1
    scheduler.pull_succeeded(first)
    scheduler.abort(first)
    assert scheduler.admit() == [big, small]
    # two pulls in flight make max_num_seqs: a third waits, though it would fit
    third = _seq("third", 2)
    scheduler.add_request(third)
    assert scheduler.num_pulling == 2 and scheduler.admit() == []
    scheduler.pull_succeeded(small)
    assert scheduler.admit() == []  # small is running now: still two in flight
    scheduler.abort(small)
    assert scheduler.admit() == [third] and scheduler.admission_blocks == 0


def test_preempted_sequences_resume_before_new_requests_are_admitted(model_dir):
    """Two long sequences outgrow the pool; the one preempted waits for its recompute. New short
    requests arrive every other step; none is admitted while a preempted sequence waits, and every
    request finishes with every block back."""
    engine = _engine(model_dir, num_blocks=23, max_model_len=256)
    scheduler = DecodeScheduler(engine.block_manager, max_num_seqs=64, max_num_batched_tokens=8192)
    longs = [_seq(f"long{i}", 100, max_tokens=150) for i in range(2)]
    for seq in longs:
        scheduler.add_request(seq)
    everything = list(longs)
    admitted_while_preempted = []
    for t in range(400):
        if t % 2 == 0 and t < 300:
            everything.append(_seq(f"short{t}", 40, max_tokens=6))
            scheduler.add_request(everything[-1])
        waiting_before = bool(scheduler.waiting)
        admitted = _step(scheduler, engine)
        if waiting_before:
            admitted_while_preempted += admitted
        if not scheduler.has_work():
            break
    assert scheduler.num_preemptions >= 1
    assert admitted_while_preempted == []
    assert all(seq.status is SequenceStatus.FINISHED for seq in everything)
    assert all(seq.num_output_tokens == 150 for seq in longs)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_a_pull_that_failed_mid_transfer_quarantines_its_blocks_and_is_recomputed_elsewhere(model_dir):
    """A pull that broke off may still have the daemon's copy writing into its blocks: they stay out of
    the pool until released, while the request is recomputed in other blocks. A pull refused before
    any copy (NOT_FOUND) gives its blocks back at once."""
    engine = _engine(model_dir, num_blocks=64, max_model_len=512)
    blocks = engine.block_manager
    scheduler = DecodeScheduler(blocks, max_num_seqs=64, max_num_batched_tokens=8192)
    late, refused = _seq("late", 100, max_tokens=5), _seq("refused", 100, max_tokens=5)
    scheduler.add_request(late)
    scheduler.add_request(refused)
    assert scheduler.admit() == [late, refused]
    late_blocks = list(late.block_table)
    quarantined = scheduler.pull_failed(late, blocks_may_be_written=True)
    assert scheduler.pull_failed(refused, blocks_may_be_written=False) == []
    assert quarantined == late_blocks and scheduler.quarantined_blocks == 7
    assert blocks.num_free == 64 - 7  # only late's are held back
    assert late.status is refused.status is SequenceStatus.WAITING and scheduler.num_pulling == 0
    plan = scheduler.schedule()  # both recompute (a prefill), in blocks other than the quarantined ones
    assert plan is not None and plan.kind is StepKind.PREFILL and plan.seqs == [late, refused]
    assert not set(late.block_table) & set(late_blocks)
    engine.run(plan)
    scheduler.finish_step(plan)
    while scheduler.has_work():
        _step(scheduler, engine)
    assert late.num_output_tokens == refused.num_output_tokens == 5
    assert blocks.num_free == 64 - 7
    scheduler.release_quarantined(quarantined)
    assert scheduler.quarantined_blocks == 0 and blocks.num_free == 64


def test_no_work_while_a_recompute_waits_for_quarantined_blocks():
    """Nothing running, and the one waiting recompute needs blocks that are in quarantine: has_work
    is False until they come back (the engine thread would spin through the quarantine otherwise)."""
    blocks = BlockManager(64, BLOCK)
    scheduler = DecodeScheduler(blocks, max_num_seqs=64, max_num_batched_tokens=8192)
    big = _seq("big", 900)
    scheduler.add_request(big)
    assert scheduler.admit() == [big]
    held = scheduler.pull_failed(big, blocks_may_be_written=True)
    assert scheduler.quarantined_blocks == len(held) == 57 and scheduler.waiting
    assert not scheduler.has_work() and scheduler.schedule() is None
    scheduler.release_quarantined(held)
    assert scheduler.has_work()


def test_aborting_a_request_wherever_it_is():
    """Waiting for admission: nothing held, its KV entry must be released by the worker. Pulling:
    its blocks are freed (or quarantined) when the pull ends, and it does not run. Running or
    waiting for a recompute: freed at once. Finished: nothing to do."""
    blocks = BlockManager(64, BLOCK)
    scheduler = DecodeScheduler(blocks, max_num_seqs=64, max_num_batched_tokens=8192)
    queued, pulled, failed, running = (_seq(n, 40) for n in ("queued", "pulled", "failed", "running"))
    for seq in (pulled, failed, running):
        scheduler.add_request(seq)
    assert scheduler.admit() == [pulled, failed, running]
    scheduler.add_request(queued)
    scheduler.pull_succeeded(running)
    assert scheduler.admission_blocks == 3
    assert scheduler.abort(queued) is AbortOutcome.NOT_ADMITTED and queued not in scheduler.admission
    assert scheduler.admission_blocks == 0
    assert scheduler.abort(pulled) is AbortOutcome.PULLING
    assert scheduler.abort(failed) is AbortOutcome.PULLING
    assert scheduler.abort(running) is AbortOutcome.FREED
    assert blocks.num_free == 64 - 6  # the two pulls in flight still hold theirs
    scheduler.pull_succeeded(pulled)
    assert scheduler.pull_failed(failed, blocks_may_be_written=False) == []
    assert blocks.num_free == 64 and not scheduler.running and not scheduler.waiting and scheduler.num_pulling == 0
    assert scheduler.abort(running) is AbortOutcome.NOT_QUEUED


# ---- prefill batching ------------------------------------------------------------------------------
def test_prefill_batches_from_one_queue_under_the_token_budget_and_the_free_blocks():
    blocks = BlockManager(12, BLOCK)
    scheduler = PrefillScheduler(blocks, max_num_batched_tokens=64, max_num_seqs=8)
    a, b, c, d = (
        Sequence.from_prompt(n, [5] * k, SamplingParams()) for n, k in (("a", 30), ("b", 30), ("c", 150), ("d", 10))
    )
    for seq in (a, b, c, d):
        scheduler.add(seq)
    assert scheduler.queued_tokens == 220 and scheduler.has_work()
    assert scheduler.schedule() == [a, b]  # c would pass 64 tokens; no skipping ahead
    assert scheduler.queued_tokens == 160 and blocks.num_free == 8
    assert not scheduler.has_work() and scheduler.schedule() == []  # c needs 10 blocks, 8 are free
    scheduler.finish(a)  # ended at its first token
    scheduler.publish("kv-b", b)
    assert b.status is SequenceStatus.PUBLISHED and blocks.num_free == 10
    assert scheduler.schedule() == [c]  # over the budget, alone
    assert scheduler.release("kv-b") and not scheduler.release("kv-b")
    scheduler.abort(d)  # cancelled while queued
    scheduler.abort(c)  # cancelled after its prefill, before it was published
    assert not scheduler.waiting and scheduler.queued_tokens == 0 and blocks.num_free == 12
    assert not scheduler.has_work()


# ---- continuous batching ----------------------------------------------------------------------------
def test_a_failed_step_frees_its_own_sequences_and_no_others(model_dir):
    engine = _engine(model_dir, num_blocks=64, max_model_len=256)
    scheduler = BatchScheduler(engine.block_manager, max_num_seqs=8, max_num_batched_tokens=4096)
    first = [
        Sequence.from_prompt(f"r{i}", [7] * (20 + i), SamplingParams(max_tokens=50, ignore_eos=True)) for i in range(3)
    ]
    for seq in first:
        scheduler.add_prompt(seq)
    _step(scheduler, engine)  # prefill: all three running
    late = Sequence.from_prompt("late", [8] * 30, SamplingParams(max_tokens=5, ignore_eos=True))
    scheduler.add_prompt(late)
    plan = scheduler.schedule()
    assert plan is not None and plan.kind is StepKind.PREFILL and plan.seqs == [late]
    scheduler.fail_step(plan)  # the prefill of `late` raised
    assert late.status is SequenceStatus.FINISHED and not late.block_table
    assert scheduler.running == first and all(seq.block_table for seq in first)
    plan = scheduler.schedule()
    assert plan is not None and plan.kind is StepKind.DECODE
    scheduler.fail_step(plan)  # a decode step raised
    assert scheduler.running == [] and not scheduler.waiting
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def _prompt(name: str, length: int, max_tokens: int = 4) -> Sequence:
    return Sequence.from_prompt(
        name, [5 + i % 50 for i in range(length)], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    )


def test_chunked_prefill_puts_running_tokens_first_and_fills_the_budget_with_prompt_chunks():
    blocks = BlockManager(64, BLOCK)
    scheduler = BatchScheduler(blocks, max_num_seqs=8, max_num_batched_tokens=32, chunked_prefill=True)
    running = [_prompt(f"r{i}", 10) for i in range(3)]
    for seq in running:  # as if prefilled: all but the last token cached
        blocks.allocate_seq(seq)
        seq.num_cached = len(seq) - 1
        scheduler.add_running(seq)
    long, short = _prompt("long", 70), _prompt("short", 5)
    scheduler.add_prompt(long)
    scheduler.add_prompt(short)

    plan = scheduler.schedule()
    assert plan is not None and plan.kind is StepKind.MIXED
    assert [s.seq_id for s in plan.seqs] == ["r0", "r1", "r2", "long"]  # FCFS: "short" waits behind it
    assert plan.num_tokens == [1, 1, 1, 29]  # the budget's rest goes to the prompt's first chunk
    assert len(long.block_table) == blocks.blocks_for_tokens(70)  # blocks for the whole prompt at once
    for seq, n in zip(plan.seqs, plan.num_tokens):  # as the engine would have run it
        seq.num_cached += n
    for seq in running:
        seq.token_ids.append(7)
    scheduler.finish_step(plan)

    plan = scheduler.schedule()
    assert plan is not None
    assert [s.seq_id for s in plan.seqs] == ["r0", "r1", "r2", "long"] and plan.num_tokens == [1, 1, 1, 29]
    for seq, n in zip(plan.seqs, plan.num_tokens):
        seq.num_cached += n
    for seq in running:
        seq.token_ids.append(7)
    scheduler.finish_step(plan)

    plan = scheduler.schedule()  # the prompt's last 12 tokens, and "short" whole in what is left
    assert plan is not None
    assert [s.seq_id for s in plan.seqs] == ["r0", "r1", "r2", "long", "short"]
    assert plan.num_tokens == [1, 1, 1, 12, 5]


def test_chunked_prefill_without_prompts_is_a_plain_decode_step_and_preempts_a_part_prefilled_prompt():
    blocks = BlockManager(8, BLOCK)
    scheduler = BatchScheduler(blocks, max_num_seqs=4, max_num_batched_tokens=16, chunked_prefill=True)
    running = [_prompt("a", 16), _prompt("b", 16)]
    for seq in running:  # one block each, whose last row this step fills
        blocks.allocate_seq(seq)
        seq.num_cached = 15
        scheduler.add_running(seq)
    plan = scheduler.schedule()
    assert plan is not None and plan.kind is StepKind.DECODE and plan.seqs == running

    late = _prompt("late", 80)  # 5 blocks: of the 6 free, the last is the watermark
    scheduler.add_prompt(late)
    plan = scheduler.schedule()
    assert plan is not None and plan.kind is StepKind.MIXED and plan.seqs == [*running, late]
    assert plan.num_tokens == [1, 1, 14] and blocks.num_free == 1
    for seq, n in zip(plan.seqs, plan.num_tokens):
        seq.num_cached += n
    for seq in running:
        seq.token_ids.append(7)  # 17 tokens: each needs a second block, and one is free
    scheduler.finish_step(plan)

    plan = scheduler.schedule()
    assert scheduler.num_preemptions == 1 and scheduler.waiting[0] is late  # the latest admitted goes
    assert late.num_cached == 0 and not late.block_table  # computed again from its first token later
    assert plan is not None and plan.kind is StepKind.DECODE and plan.seqs == running


def test_chunked_prefill_needs_a_budget_for_every_running_sequence():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        BatchScheduler(BlockManager(8, BLOCK), max_num_seqs=64, max_num_batched_tokens=32, chunked_prefill=True)
