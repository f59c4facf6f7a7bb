"""The part of the decode and colocated workers that is the same: a continuous batch on the engine
thread whose tokens stream back to each request's gRPC call, with cancellation that frees blocks
at once. The decode worker adds KV admission and pulls; the colocated worker admits prompts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.v1 import common_pb2
from services.engine import Engine, Sequence, StepOutput
from services.engine.scheduler import BatchScheduler

from .engine_worker import EngineThread, LoadStats, StepFailed, base_stats, register_kv_gauges
from .metrics import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS
from .step_log import StepLog

log = logging.getLogger(__name__)

_DONE = object()
# why a decode worker recomputed KV instead of pulling it (gRPC status names of the failed pull)
RECOMPUTE_REASONS = ("not_found", "unavailable", "deadline_exceeded", "failed_precondition", "internal", "other")


@dataclass(eq=False)
class StreamJob:
    seq: Sequence
    request_id: str
    outbox: asyncio.Queue
    enqueued_at: float = field(default_factory=time.monotonic)
    state: str = "waiting"  # waiting -> (pulling ->) running -> done
    cancelled: bool = False
    handle: common_pb2.KvHandle | None = None
    unsent: common_pb2.TokenChunk | None = None  # tokens held back by --stream-interval
    prefilled: bool = False  # its first prefill here was reported (TokenChunk.queue_seconds)


class BatchingMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.running = Gauge("pdserve_decode_running_requests", "Sequences in the running (decode) batch.", registry=registry)
        self.waiting = Gauge("pdserve_decode_waiting_requests", "Requests admitted to the worker but not yet running.",
                             registry=registry)
        self.admission_wait = Histogram("pdserve_decode_admission_wait_seconds",
                                        "Time from a request's arrival until it was given KV blocks.",
                                        buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self.step_seconds = Histogram("pdserve_decode_step_duration_seconds", "Duration of one engine step.",
                                      ["kind"], buckets=TOKEN_LATENCY_BUCKETS + (10.0, 30.0), registry=registry)
        self.batch_size = Histogram("pdserve_decode_batch_size", "Sequences per decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.preemptions = Counter("pdserve_decode_preemptions_total",
                                   "Running sequences preempted for lack of KV blocks (recomputed later).", registry=registry)
        self.recomputes = Counter("pdserve_decode_kv_recomputes_total",
                                  "Requests whose KV was recomputed here because the pull failed.", ["reason"],
                                  registry=registry)
        for kind in ("prefill", "decode"):
            self.step_seconds.labels(kind)
        for reason in RECOMPUTE_REASONS:
            self.recomputes.labels(reason)
        self.generated_tokens = Counter("pdserve_decode_generated_tokens_total", "Tokens produced by this worker.",
                                        registry=registry)
        self.failed_steps = Counter("pdserve_decode_failed_steps_total",
                                    "Engine steps that raised; their requests failed with INTERNAL.", registry=registry)


class BatchingWorker:
    role = "decode"
    step_log: StepLog | None = None  # --step-log

    def __init__(self, engine: Engine, *, node_id: str, model_name: str, max_num_seqs: int,
                 max_num_batched_tokens: int, registry: CollectorRegistry, stream_interval: int = 1):
        self.engine = engine
        # Tokens per message to the router (the last always goes at once). Every message costs the
        # worker, the router and the client tens of microseconds of CPU; at high token rates,
        # sending every 4-8 tokens saves most of it, at no cost to TTFT or TPOT, only to how
        # smoothly text appears (SGLang's and vLLM's --stream-interval).
        self.stream_interval = stream_interval
        self.node_id = node_id
        self.model_name = model_name
        self.scheduler = BatchScheduler(engine, max_num_seqs, max_num_batched_tokens)
        self.metrics = BatchingMetrics(registry)
        register_kv_gauges(registry, engine, self.role)
        self.load = LoadStats()
        self.jobs: dict[str, StreamJob] = {}  # seq_id -> job (engine thread)
        self.draining = False
        self._preemptions_seen = 0
        self.thread = EngineThread(f"{self.role}-engine", self._step, self._has_work)

    async def start(self) -> None:
        self.thread.start(asyncio.get_running_loop())

    # ---- to override ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Engine thread, before each step: move waiting requests into the scheduler."""

    def _has_pending_admissions(self) -> bool:
        return False

    # ---- engine thread ------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return self.scheduler.has_work or self._has_pending_admissions()

    def _step(self) -> None:
        self._admit()
        if not self.scheduler.has_work:
            return
        started = time.monotonic()
        lengths = [len(seq.token_ids) for seq in self.scheduler.running] if self.step_log is not None else []
        involved = list(self.scheduler.running) + list(self.scheduler.waiting)  # the step takes from these
        try:
            outputs = self.scheduler.step()
        except Exception as exc:  # noqa: BLE001 - e.g. a device error: fail its requests, keep serving
            log.exception("engine step failed; failing its %d requests", len(involved))
            self.metrics.failed_steps.inc()
            self._fail(involved, StepFailed(exc))
            return
        elapsed = time.monotonic() - started
        if self.step_log is not None and outputs:
            self._log_step(started, elapsed, outputs, lengths)
        if outputs:
            kind = self.scheduler.last_step_kind
            self.metrics.step_seconds.labels(kind).observe(elapsed)
            if kind == "decode":
                self.metrics.batch_size.observe(len(outputs))
            else:
                self.load.observe(elapsed, sum(o.seq.num_cached for o in outputs))
        if self.scheduler.num_preemptions > self._preemptions_seen:
            self.metrics.preemptions.inc(self.scheduler.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = self.scheduler.num_preemptions
        self.metrics.generated_tokens.inc(len(outputs))
        prefilled = self.scheduler.last_step_kind == "prefill"
        for out in outputs:
            self._deliver(out, (started, elapsed) if prefilled else None)
        self._update_gauges()

    def _log_step(self, started: float, elapsed: float, outputs: list[StepOutput], lengths: list[int]) -> None:
        record = {"t": round(started, 6), "kind": self.scheduler.last_step_kind}
        if record["kind"] == "decode":
            record.update(batch=len(lengths), context_tokens=sum(lengths), max_context=max(lengths))
        else:
            record["lengths"] = [o.seq.num_cached for o in outputs]
        record.update(running_after=len(self.scheduler.running), seconds=round(elapsed, 6))
        self.step_log.write(record)

    def _deliver(self, out: StepOutput, prefill: tuple[float, float] | None = None) -> None:
        """prefill: (started, seconds) when `out` comes from a prefill step."""
        job = self.jobs.get(out.seq.seq_id)
        if job is None:
            return
        chunk = job.unsent or common_pb2.TokenChunk()
        if prefill is not None and not job.prefilled:  # (a recompute after preemption is not a wait)
            job.prefilled = True
            chunk.queue_seconds, chunk.prefill_seconds = prefill[0] - job.enqueued_at, prefill[1]
        chunk.token_ids.append(out.token_id)
        if out.seq.sampling.logprobs:
            chunk.logprobs.append(out.logprob)
        chunk.finish_reason = out.finish_reason or ""
        if out.finish_reason or len(chunk.token_ids) >= self.stream_interval:
            job.unsent = None
            self.thread.emit(job.outbox.put_nowait, chunk)
        else:
            job.unsent = chunk
        if out.finish_reason:
            job.state = "done"
            del self.jobs[out.seq.seq_id]
            self.thread.emit(job.outbox.put_nowait, _DONE)

    def _fail(self, seqs: list[Sequence], error: StepFailed) -> None:
        """Ends these sequences with `error`: out of the scheduler, blocks freed, streams told."""
        for seq in seqs:
            if self.scheduler.abort(seq.seq_id) is None:  # the failed step had taken it off the queues
                self.engine.free(seq)  # (nothing to free if the step had freed it already)
            job = self.jobs.pop(seq.seq_id, None)
            if job is not None:
                job.state = "done"
                self.thread.emit(job.outbox.put_nowait, error)
        self._update_gauges()

    def _cancel(self, job: StreamJob) -> None:
        job.cancelled = True
        self.jobs.pop(job.seq.seq_id, None)
        if job.state in ("waiting", "running"):
            self.scheduler.abort(job.seq.seq_id)
        self._forget_cancelled(job)
        self._update_gauges()

    def _forget_cancelled(self, job: StreamJob) -> None:
        """Subclass hook for state the scheduler does not know about."""

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.jobs) - len(self.scheduler.running))

    # ---- asyncio side ---------------------------------------------------------------------------
    def new_job(self, request_id: str, seq: Sequence) -> StreamJob:
        return StreamJob(seq=seq, request_id=request_id, outbox=asyncio.Queue())

    async def stream(self, job: StreamJob, context) -> None:
        """Writes TokenChunks (coalescing tokens that piled up) until the sequence finishes.

        A coroutine writing with context.write, not an async generator: when the caller cancels,
        grpc cancels this coroutine wherever it waits (a generator paused at `yield` would only
        be finalised by the garbage collector, leaving the sequence running, its blocks held)."""
        finished = False
        try:
            while True:
                item = await job.outbox.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    await context.abort(getattr(item, "code", grpc.StatusCode.INTERNAL), str(item))
                while not job.outbox.empty():
                    nxt = job.outbox.get_nowait()
                    if nxt is _DONE or isinstance(nxt, BaseException):
                        job.outbox.put_nowait(nxt)  # handled on the next turn
                        break
                    item.token_ids.extend(nxt.token_ids)
                    item.logprobs.extend(nxt.logprobs)
                    item.finish_reason = nxt.finish_reason
                await context.write(item)
        finally:
            if not finished:  # cancelled, deadline passed, or the write failed: stop the sequence now
                self.thread.post(lambda: self._cancel(job))

    async def Stats(self, request, context):
        stats = base_stats(self.engine, self.role, self.node_id, self.model_name)
        stats.running = len(self.scheduler.running)
        stats.waiting = max(0, len(self.jobs) - len(self.scheduler.running))
        stats.prefill_seconds_per_token = self.load.seconds_per_token
        stats.draining = self.draining
        return stats

    async def drain(self) -> None:
        """Finish every request in flight, then stop the engine thread."""
        self.draining = True
        while self.jobs:
            await asyncio.sleep(0.05)
        self.thread.stop()


def new_seq_id(request_id: str) -> str:
    # request ids come from clients and may repeat; engine state is keyed by a unique id
    return f"{request_id}#{uuid.uuid4().hex[:8]}"
