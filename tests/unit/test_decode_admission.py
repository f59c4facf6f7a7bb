"""The decode worker's admission policy, stepped by hand on a real engine.

The KV pull is the one thing not real here: a pull is taken to succeed at once (the kvstore and
the transfer are tested in tests/integration and tests/e2e); what is checked is which request
gets blocks when.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from services.common.batching_worker import new_seq_id
from services.decode.server import DecodeService
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


@pytest.fixture(autouse=True)
def _close_loop():
    yield
    asyncio.get_event_loop_policy().get_event_loop().close()
