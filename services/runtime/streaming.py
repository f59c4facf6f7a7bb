"""The decode and colocated workers' common part: a continuous batch on the engine thread whose
tokens stream back to each request's gRPC call, with cancellation that frees blocks at once.

    gRPC handler  --post(submit)-->  engine thread: scheduler.schedule() -> engine.run(plan)
        ^                                               |  tokens, per job
        +------- job.outbox <--emit(put_nowait)---------+

Subclasses say how a request enters the scheduler (the decode worker: through pull admission;
the colocated worker: as a prompt) and may do work before each step (`before_step`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.v1 import common_pb2
from services.common.enums import Role
from services.common.errors import ServiceError
from services.common.metrics import TOKEN_LATENCY_BUCKETS
from services.engine.engine import EngineBase, StepOutput
from services.engine.scheduler import AbortOutcome, BatchScheduler, StepKind, StepPlan
from services.engine.sequence import Sequence

from .engine_thread import EngineThread
from .step_log import StepLog
from .worker import PrefillRate, register_kv_gauges, worker_stats

log = logging.getLogger(__name__)

_DONE = object()  # the last item of a job's outbox


@dataclass(eq=False)
class StreamJob:
    """One request's stream. `seq.status` is where it is (sequence.py)."""

    seq: Sequence
    request_id: str
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # TokenChunk, a ServiceError, or _DONE
    enqueued_at: float = field(default_factory=time.monotonic)
    handle: common_pb2.KvHandle | None = None  # decode: where its KV waits to be pulled
    unsent: common_pb2.TokenChunk | None = None  # tokens held back by --stream-interval
    prefill_started: float | None = None  # when its first prefill (or first chunk) here began
    prefilled: bool = False  # that prefill's end was reported (TokenChunk.queue_seconds)


class BatchMetrics:
    """The running batch's metrics. Named pdserve_decode_* for decode and colocated workers alike
    (docs/metrics.md): a colocated worker's prefill steps are `step_duration_seconds{kind="prefill"}`."""

    def __init__(self, registry: CollectorRegistry):
        self.running = Gauge(
            "pdserve_decode_running_requests", "Sequences in the running (decode) batch.", registry=registry
        )
        self.waiting = Gauge(
            "pdserve_decode_waiting_requests", "Requests admitted to the worker but not yet running.", registry=registry
        )
        self.step_seconds = Histogram(
            "pdserve_decode_step_duration_seconds",
            "Duration of one engine step.",
            ["kind"],
            buckets=TOKEN_LATENCY_BUCKETS + (10.0, 30.0),
            registry=registry,
        )
        self.batch_size = Histogram(
            "pdserve_decode_batch_size",
            "Sequences per decode step.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.preemptions = Counter(
            "pdserve_decode_preemptions_total",
            "Running sequences preempted for lack of KV blocks (recomputed later).",
            registry=registry,
        )
        self.generated_tokens = Counter(
            "pdserve_decode_generated_tokens_total", "Tokens produced by this worker.", registry=registry
        )
        self.failed_steps = Counter(
            "pdserve_decode_failed_steps_total",
            "Engine steps that raised; their requests failed with INTERNAL.",
            registry=registry,
        )
        for kind in StepKind:
            self.step_seconds.labels(kind.value)


class StreamingWorker:
    role: Role
    scheduler_class: type[BatchScheduler]  # the policy: BatchScheduler or DecodeScheduler
    step_log: StepLog | None = None  # --step-log

    def __init__(
        self,
        engine: EngineBase,
        *,
        node_id: str,
        model_name: str,
        registry: CollectorRegistry,
        stream_interval: int = 1,
    ):
        self.engine = engine
        self.scheduler = self.new_scheduler()
        # Tokens per message to the router (the last always goes at once): each message costs the
        # worker, the router and the client CPU time, so at high token rates sending every few
        # tokens saves most of it, at no cost to TTFT or TPOT (SGLang's and vLLM's --stream-interval).
        self.stream_interval = stream_interval
        self.node_id = node_id
        self.model_name = model_name
        self.metrics = BatchMetrics(registry)
        register_kv_gauges(registry, engine, self.role)
        self.prefill_rate = PrefillRate()
        self.jobs: dict[str, StreamJob] = {}  # seq_id -> job, engine thread only
        self.draining = False
        self._preemptions_seen = 0
        self.thread = EngineThread(f"{self.role}-engine", self.step, self.scheduler.has_work)

    def new_scheduler(self) -> BatchScheduler:
        config = self.engine.config
        return self.scheduler_class(self.engine.block_manager, config.max_num_seqs, config.max_num_batched_tokens)

    async def start(self) -> None:
        self.thread.start(asyncio.get_running_loop())

    # ---- engine thread ------------------------------------------------------------------------
    def submit(self, job: StreamJob) -> None:
        """Engine thread: the job's sequence enters the scheduler (as `enter` says)."""
        self.jobs[job.seq.seq_id] = job
        self.enter(job)
        self._update_gauges()

    def enter(self, job: StreamJob) -> None:
        raise NotImplementedError

    def before_step(self) -> None:
        """Engine thread, before each step."""

    def step(self) -> None:
        """Engine thread: one scheduler step, its tokens delivered to their streams."""
        self.before_step()
        plan = self.scheduler.schedule()
        if self.scheduler.num_preemptions > self._preemptions_seen:  # (schedule() preempts)
            self.metrics.preemptions.inc(self.scheduler.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = self.scheduler.num_preemptions
        if plan is None:
            return
        started = time.monotonic()
        lengths = [len(seq.token_ids) for seq in plan.seqs] if self.step_log is not None else []
        cached = [seq.num_cached for seq in plan.seqs]
        if plan.kind is not StepKind.DECODE:
            for seq in plan.seqs:
                job = self.jobs.get(seq.seq_id)
                next_token = len(seq) - seq.num_cached == 1 and seq.num_cached > 0  # not a prompt (chunk)
                if job is not None and job.prefill_started is None and not next_token:
                    job.prefill_started = started
        try:
            outputs = self.engine.run(plan)
        except Exception as exc:
            log.exception("engine step failed; failing its %d requests", len(plan.seqs))
            self.metrics.failed_steps.inc()
            self.fail(plan, f"engine step failed: {exc!r}")
            return
        ended = time.monotonic()
        self.scheduler.finish_step(plan)
        self._record(plan, outputs, started, ended - started, lengths, cached)
        for out in outputs:
            self._deliver(out, ended)
        self._update_gauges()

    def _record(
        self,
        plan: StepPlan,
        outputs: list[StepOutput],
        started: float,
        elapsed: float,
        lengths: list[int],
        cached: list[int],
    ) -> None:
        """lengths, cached: each sequence's tokens, and those with K/V in the pool, before the step."""
        self.metrics.step_seconds.labels(plan.kind.value).observe(elapsed)
        if plan.kind is StepKind.DECODE:
            self.metrics.batch_size.observe(len(outputs))
        elif plan.kind is StepKind.PREFILL:
            self.prefill_rate.observe(elapsed, sum(len(seq.token_ids) - 1 for seq in plan.seqs))
        if self.step_log is not None:
            record: dict[str, object] = {"t": round(started, 6), "kind": plan.kind.value}
            if plan.kind is StepKind.DECODE:
                record.update(batch=len(lengths), context_tokens=sum(lengths), max_context=max(lengths))
            elif plan.kind is StepKind.PREFILL:
                record["lengths"] = lengths
            else:  # each sequence's (tokens cached before, tokens computed)
                assert plan.num_tokens is not None
                record["chunks"] = [[c, n] for c, n in zip(cached, plan.num_tokens, strict=True)]
            record.update(running_after=len(self.scheduler.running), seconds=round(elapsed, 6))
            self.step_log.write(record)
        self.metrics.generated_tokens.inc(len(outputs))

    def _deliver(self, out: StepOutput, step_ended: float) -> None:
        job = self.jobs.get(out.seq.seq_id)
        if job is None:
            return
        chunk = job.unsent or common_pb2.TokenChunk()
        if job.prefill_started is not None and not job.prefilled:  # (a recompute after preemption is not a wait)
            job.prefilled = True
            chunk.queue_seconds = job.prefill_started - job.enqueued_at
            chunk.prefill_seconds = step_ended - job.prefill_started
        chunk.token_ids.append(out.token_id)
        if out.seq.sampling.logprobs:
            chunk.logprobs.append(out.logprob)
        chunk.finish_reason = out.finish_reason or ""
        # A request's first and last tokens go at once (TTFT and end-to-end latency as without
        # grouping); those between, every --stream-interval tokens.
        first = out.seq.num_output_tokens == 1
        if first or out.finish_reason or len(chunk.token_ids) >= self.stream_interval:
            job.unsent = None
            self.thread.emit(job.outbox.put_nowait, chunk)
        else:
            job.unsent = chunk
        if out.finish_reason:
            del self.jobs[out.seq.seq_id]
            self.thread.emit(job.outbox.put_nowait, _DONE)

    def fail(self, plan: StepPlan, message: str) -> None:
        """Engine thread: the step's sequences end with INTERNAL `message`: out of the scheduler,
        blocks freed, streams told."""
        self.scheduler.fail_step(plan)
        for seq in plan.seqs:
            job = self.jobs.pop(seq.seq_id, None)
            if job is not None:  # one error each: every stream raises its own
                self.thread.emit(job.outbox.put_nowait, ServiceError(grpc.StatusCode.INTERNAL, message))
        self._update_gauges()

    def cancel(self, job: StreamJob) -> None:
        """Engine thread: the job's caller went away."""
        self.jobs.pop(job.seq.seq_id, None)
        self.aborted(job, self.scheduler.abort(job.seq))
        self._update_gauges()

    def aborted(self, job: StreamJob, outcome: AbortOutcome) -> None:
        """Engine thread, after `cancel`: what else the role must do, given where the job was."""

    def _update_gauges(self) -> None:
        running = len(self.scheduler.running)
        self.metrics.running.set(running)
        self.metrics.waiting.set(len(self.jobs) - running)

    # ---- asyncio side ---------------------------------------------------------------------------
    def new_job(self, request_id: str, seq: Sequence) -> StreamJob:
        return StreamJob(seq=seq, request_id=request_id)

    async def submit_and_stream(self, job: StreamJob, context: grpc.aio.ServicerContext) -> None:
        """Submits the job to the engine thread and writes its TokenChunks (coalescing tokens that piled up) until the
        sequence finishes.

        A coroutine writing with context.write, not an async generator: when the caller cancels,
        grpc cancels this coroutine wherever it waits (a generator paused at `yield` would only
        be finalised by the garbage collector, leaving the sequence running, its blocks held)."""
        self.thread.post(lambda: self.submit(job))
        finished = False
        try:
            while True:
                item = await job.outbox.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, ServiceError):
                    finished = True  # the engine thread has dropped it already
                    raise item
                while not job.outbox.empty():
                    nxt = job.outbox.get_nowait()
                    if nxt is _DONE or isinstance(nxt, ServiceError):
                        job.outbox.put_nowait(nxt)  # handled on the next turn
                        break
                    item.token_ids.extend(nxt.token_ids)
                    item.logprobs.extend(nxt.logprobs)
                    item.finish_reason = nxt.finish_reason
                await context.write(item)
        finally:
            if not finished:  # cancelled, deadline passed, or the write failed: stop the sequence now
                self.thread.post(lambda: self.cancel(job))

    async def Stats(self, request, context) -> common_pb2.WorkerStats:
        stats = worker_stats(self.engine, self.role, self.node_id, self.model_name)
        stats.running = len(self.scheduler.running)
        stats.waiting = max(0, len(self.jobs) - len(self.scheduler.running))
        stats.prefill_seconds_per_token = self.prefill_rate.seconds_per_token
        stats.draining = self.draining
        return stats

    async def drain(self) -> None:
        """Finish every request in flight, then stop the engine thread."""
        self.draining = True
        while self.jobs:
            await asyncio.sleep(0.05)
        self.thread.stop()
