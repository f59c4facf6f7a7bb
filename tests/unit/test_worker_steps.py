"""The workers' engine-thread logic, stepped by hand on a real engine: the decode worker's
admission policy, and what a failing engine step does to a decode and a prefill worker.

Not real here: the KV pull is taken to succeed at once (the kvstore and the transfer are tested
in tests/integration and tests/e2e), and a failing step is injected (it stands in for a device
error, which a CPU run cannot produce).
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from prometheus_client import CollectorRegistry

from services.common.batching_worker import new_seq_id
from services.common.engine_worker import StepFailed
from services.decode.server import DecodeService
from services.prefill.server import PrefillJob, PrefillService
from services.engine import Engine, EngineConfig, SamplingParams, Sequence
from services.engine.testmodels import get_model


def _service(num_blocks: int, max_model_len: int) -> DecodeService:
    model = get_model("llama")
    probe = Engine(model, EngineConfig(kv_cache_bytes=1 << 20, max_model_len=max_model_len))
    block_bytes = probe.kv_pool.layout.block_bytes
    probe.close()
    engine = Engine(model, EngineConfig(kv_cache_bytes=num_blocks * block_bytes, max_model_len=max_model_len))
    asyncio.set_event_loop(asyncio.new_event_loop())  # StreamJob's outbox is an asyncio.Queue
    service = DecodeService(engine, kvstore=None, worker_id="decode-test", node_id="n", model_name="m",
                            max_num_seqs=64, max_num_batched_tokens=8192, registry=CollectorRegistry())
    service.started_pulls = []
    # The engine thread hands pulls to the asyncio loop; here they are collected and completed
    # by `step` instead, successfully.
    service.thread.emit = lambda fn, *args: service.started_pulls.append(args[0]) if fn == service._start_pull else None
    return service


def _submit(service: DecodeService, name: str, context: int, max_tokens: int):
    tokens = [5 + i % 50 for i in range(context)]
    seq = Sequence(seq_id=new_seq_id(name), token_ids=tokens, num_prompt_tokens=context - 1,
                   sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    job = service.new_job(name, seq)
    service._enqueue(job)
    return job


def _step(service: DecodeService) -> list:
    """One engine-thread step; returns the jobs whose pull started in it (were admitted)."""
    service._step()
    admitted, service.started_pulls = service.started_pulls, []
    for job in admitted:
        service._pulled(job, None)
    return admitted


def test_an_idle_worker_admits_a_request_that_needs_its_whole_pool():
    """The pool holds exactly one max_model_len sequence (the engine's minimum): a request that
    needs every block waits for nothing; the watermark is kept only while others hold blocks."""
    service = _service(num_blocks=65, max_model_len=1024)  # 64 usable blocks of 16 tokens + 1 null
    assert service.engine.block_manager.num_blocks == 64 and service.scheduler.watermark_blocks >= 1
    long_job = _submit(service, "long", context=1023, max_tokens=4)
    short_job = _submit(service, "short", context=10, max_tokens=3)
    assert _step(service) == [long_job]
    for _ in range(5):
        _step(service)
    assert long_job.state == "done" and len(long_job.seq.token_ids) == 1024  # ends at max_model_len
    assert short_job.state == "done"
    assert service.engine.block_manager.num_free == 64


def test_preempted_sequences_resume_before_new_requests_are_admitted():
    """Two long sequences outgrow the pool; the one preempted waits in the scheduler's queue.
    New short requests arrive every other step; none is admitted while a preempted sequence
    waits, and every request finishes. (That a preempted sequence's tokens are unchanged is
    tests/unit/test_scheduler.py's; here the pulled KV is not real.)"""
    service = _service(num_blocks=24, max_model_len=256)
    longs = [_submit(service, f"long{i}", context=100, max_tokens=150) for i in range(2)]
    admitted_while_preempted = []
    preempted_steps = 0
    for t in range(400):
        if t % 2 == 0 and t < 300:
            _submit(service, f"short{t}", context=40, max_tokens=6)
        waiting_before = bool(service.scheduler.waiting)
        admitted = _step(service)
        if waiting_before:
            preempted_steps += 1
            admitted_while_preempted += [job.request_id for job in admitted]
        if all(job.state == "done" for job in longs) and not service.jobs:
            break
    assert service.scheduler.num_preemptions >= 1 and preempted_steps > 0
    assert admitted_while_preempted == []
    assert all(job.state == "done" and job.seq.num_output_tokens == 150 for job in longs)
    assert not service.jobs and service.engine.block_manager.num_free == service.engine.block_manager.num_blocks


def _drain(job) -> list:
    items = []
    while not job.outbox.empty():
        items.append(job.outbox.get_nowait())
    return items


def test_blocks_of_a_pull_that_failed_mid_transfer_are_reused_only_after_a_grace():
    """A pull that failed on its deadline may still have the daemon's copy writing into its blocks
    (the daemon stops at its next copy run): they stay out of the pool for the grace period, while
    the request is recomputed in fresh blocks. A pull refused before any copy (NOT_FOUND) gives
    its blocks back at once."""
    service = _service(num_blocks=64, max_model_len=512)
    loop = asyncio.get_event_loop()
    posted = []  # engine-thread callables from the asyncio side, run by hand below
    service.thread.emit = lambda fn, *args: (service.started_pulls.append(args[0]) if fn == service._start_pull
                                             else loop.call_soon(fn, *args))
    service.thread.post = posted.append
    service.unsettled_pull_grace_seconds = 0.2
    total = service.engine.block_manager.num_blocks
    late, refused = _submit(service, "late", 100, 5), _submit(service, "refused", 100, 5)
    service._step()
    assert service.started_pulls == [late, refused]
    late_blocks = list(late.seq.block_table)

    service._pulled(late, "deadline_exceeded", "deadline_exceeded")
    service._pulled(refused, "not_found", "not_found")
    assert service.quarantined_blocks == len(late_blocks) == 7
    assert service.engine.block_manager.num_free == total - len(late_blocks)  # only late's are held back
    loop.run_until_complete(asyncio.sleep(0.05))
    service._step()  # both recompute, in blocks other than the quarantined ones
    assert not set(late.seq.block_table) & set(late_blocks) and late.seq.block_table and refused.seq.block_table
    assert not posted, "nothing is released before the grace"

    loop.run_until_complete(asyncio.sleep(0.3))
    assert len(posted) == 1
    posted.pop()()
    assert service.quarantined_blocks == 0
    for _ in range(10):
        _step(service)
    assert late.state == refused.state == "done"
    assert service.engine.block_manager.num_free == total


def test_the_engine_thread_idles_while_a_recompute_waits_for_quarantined_blocks():
    """Nothing running, and the one waiting recompute needs blocks that are in quarantine: no work
    until they come back (the engine thread spun at 100% CPU through the grace before)."""
    service = _service(num_blocks=64, max_model_len=1000)
    loop = asyncio.get_event_loop()
    service.thread.emit = lambda fn, *args: (service.started_pulls.append(args[0]) if fn == service._start_pull
                                             else loop.call_soon(fn, *args))
    big = _submit(service, "big", 900, 5)
    service._step()
    held = list(big.seq.block_table)
    service._pulled(big, "deadline_exceeded", "deadline_exceeded")
    assert service.quarantined_blocks == len(held) and service.scheduler.waiting
    assert not service._has_work()
    service._release_quarantined(held)
    assert service._has_work()


def test_a_failing_decode_step_fails_its_requests_frees_their_blocks_and_the_worker_goes_on(monkeypatch):
    service = _service(num_blocks=64, max_model_len=256)
    service.thread.loop = asyncio.get_event_loop()
    emitted = []
    pull = service.thread.emit
    service.thread.emit = lambda fn, *args: pull(fn, *args) if fn == service._start_pull else emitted.append((fn, args))
    jobs = [_submit(service, f"r{i}", context=20 + 10 * i, max_tokens=50) for i in range(3)]
    for _ in range(3):
        _step(service)
    assert [job.state for job in jobs] == ["running"] * 3
    real_decode = service.engine.runner.decode
    monkeypatch.setattr(service.engine.runner, "decode", lambda seqs: (_ for _ in ()).throw(RuntimeError("device lost")))
    _step(service)  # blocks are allocated for the step, then the forward pass raises
    errors = [args[0] for fn, args in emitted if isinstance(args[0], StepFailed)]
    assert len(errors) == 3 and "device lost" in str(errors[0])
    assert all(job.state == "done" for job in jobs) and not service.jobs
    assert service.scheduler.running == [] and service.scheduler.waiting == deque()
    assert service.engine.block_manager.num_free == service.engine.block_manager.num_blocks
    assert service.metrics.failed_steps._value.get() == 1
    monkeypatch.setattr(service.engine.runner, "decode", real_decode)
    after = _submit(service, "after", context=30, max_tokens=5)
    for _ in range(6):
        _step(service)
    assert after.state == "done" and after.seq.num_output_tokens == 5
    assert service.engine.block_manager.num_free == service.engine.block_manager.num_blocks


def test_a_failing_prefill_fails_its_prompts_frees_their_blocks_and_the_worker_goes_on(monkeypatch):
    engine = Engine(get_model("llama"), EngineConfig(kv_cache_bytes=4 << 20, max_model_len=256))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    service = PrefillService(engine, kvstore=None, worker_id="prefill-test", node_id="n", model_name="m",
                             max_num_batched_tokens=8192, max_num_seqs=16, registry=CollectorRegistry())
    service.thread.loop = loop  # emit() hands results to this loop; run_until_complete delivers them

    def enqueue(n):
        seq = Sequence.from_prompt(f"p{n}", [5 + i % 40 for i in range(10 + n)],
                                   SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        job = PrefillJob(seq, loop.create_future())
        service._enqueue(job)
        return job

    real_prefill = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda seqs: (_ for _ in ()).throw(RuntimeError("device lost")))
    failed = [enqueue(n) for n in range(3)]
    service._step()  # blocks allocated for the batch, then the forward pass raises
    loop.run_until_complete(asyncio.wait([job.future for job in failed], timeout=5))
    assert all(isinstance(job.future.exception(), StepFailed) for job in failed)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert not service.waiting and service.queued_tokens == 0
    monkeypatch.setattr(engine.runner, "prefill", real_prefill)
    ok = enqueue(5)
    service._step()
    loop.run_until_complete(asyncio.wait([ok.future], timeout=5))
    assert ok.future.result().token_id >= 0 and ok.seq.block_table  # computed, held for publishing
    loop.close()


@pytest.fixture(autouse=True)
def _close_loop():
    yield
    asyncio.get_event_loop_policy().get_event_loop().close()
