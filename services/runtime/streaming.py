"""The decode and colocated workers' common part: a continuous batch on the engine thread whose
tokens stream back to the callers, with cancellation that frees blocks at once.

A caller (a router) keeps one call open per worker and starts many requests on it (worker.proto:
DecodeWorker.Decode, ColocatedWorker.Generate). Each engine step's tokens, for every request of
every call, cross from the engine thread to the asyncio loop in one hand-off, and go back on each
call as one StreamUpdate: the serving cost per token is a share of a message, not a message.

    call reader  --post(submit / cancel)-->  engine thread: scheduler.schedule() -> engine.run(plan)
                                                  |  the step's chunks, all jobs
    call writer  <-- ServedCall.add <--emit(_dispatch)-+

Subclasses say how a request is checked and becomes a job (`start_job`), how it enters the
scheduler (the decode worker: through pull admission; the colocated worker: as a prompt), and may
do work before each step (`before_step`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.v1 import common_pb2, worker_pb2
from services.common.admission import Admission, Ticket, refusals_counter
from services.common.enums import Role
from services.common.errors import ServiceError, invalid
from services.common.metrics import TOKEN_LATENCY_BUCKETS
from services.common.server import COLUMNS_METADATA
from services.engine.engine import EngineBase, StepOutput
from services.engine.scheduler import AbortOutcome, BatchScheduler, StepKind, StepPlan
from services.engine.sequence import Sequence

from .engine_thread import EngineThread
from .step_log import StepLog
from .worker import PrefillRate, register_kv_gauges, worker_stats

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Produced:
    """What a request's steps produced and the engine thread hands to the loop: plain values, the
    message is built once, on the loop, in the call's next StreamUpdate (its columns, or a
    TokenChunk: worker.proto)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0


@dataclass(eq=False)
class StreamJob:
    """One request on a call. `seq.status` is where it is (sequence.py)."""

    seq: Sequence
    request_id: str
    stream_id: int = 0  # the caller's name for it on its call
    call: ServedCall | None = None  # the call it answers on
    enqueued_at: float = field(default_factory=time.monotonic)
    handle: common_pb2.KvHandle | None = None  # decode: where its KV waits to be pulled
    unsent: Produced | None = None  # tokens held back by --stream-interval
    prefill_started: float | None = None  # when its first prefill (or first chunk) here began
    prefilled: bool = False  # that prefill's end was reported (TokenChunk.queue_seconds)
    ticket: Ticket | None = None  # its share of the admission bounds, until its stream ends


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
        self.engine_cpu_seconds = Counter(
            "pdserve_decode_engine_cpu_seconds_total",
            "CPU time of the engine thread inside the engine's steps (the model's host side); "
            "what the process spends beyond it is the serving path.",
            registry=registry,
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
        max_inflight_requests: int = 0,
        max_queued_prompt_tokens: int = 0,
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
        self.admission = Admission(
            f"{self.role} worker", max_inflight_requests, max_queued_prompt_tokens, refusals_counter(registry)
        )
        self._outgoing: list[tuple[StreamJob, Produced | ServiceError]] = []  # engine thread
        self.draining = False
        self._preemptions_seen = 0
        self.thread = EngineThread(f"{self.role}-engine", self.step, self.scheduler.has_work)

    def new_scheduler(self) -> BatchScheduler:
        config = self.engine.config
        return self.scheduler_class(self.engine.block_manager, config.max_num_seqs, config.max_num_batched_tokens)

    @property
    def not_serving_reason(self) -> str:
        return ""

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

    def finishing(self, seqs: list[Sequence]) -> None:
        """Engine thread: these sequences finished (stop or length) and their blocks are about to
        be freed."""

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
                # a running sequence's next token, not a prompt (chunk) whose prefix was cached
                next_token = len(seq) - seq.num_cached == 1 and seq.num_cached > 0 and job is not None and job.prefilled
                if job is not None and job.prefill_started is None and not next_token:
                    job.prefill_started = started
        cpu_started = time.thread_time()
        try:
            outputs, failure = self.engine.run(plan), None
        except Exception as exc:
            outputs, failure = [], exc
        self.metrics.engine_cpu_seconds.inc(time.thread_time() - cpu_started)
        if failure is not None:
            log.error("engine step failed; failing its %d requests", len(plan.seqs), exc_info=failure)
            self.metrics.failed_steps.inc()
            self.fail(plan, f"engine step failed: {failure!r}")
            return
        ended = time.monotonic()
        self.finishing([out.seq for out in outputs if out.finish_reason])
        self.scheduler.finish_step(plan)
        self._record(plan, outputs, started, ended - started, lengths, cached)
        for out in outputs:
            self._deliver(out, ended)
        self._flush()
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
        elif plan.kind is StepKind.PREFILL:  # the tokens computed: not those of cached prefixes
            self.prefill_rate.observe(elapsed, sum(len(seq.token_ids) - 1 - c for seq, c in zip(plan.seqs, cached)))
        if self.step_log is not None:
            record: dict[str, object] = {"t": round(started, 6), "kind": plan.kind.value}
            if plan.kind is StepKind.DECODE:
                record.update(batch=len(lengths), context_tokens=sum(lengths), max_context=max(lengths))
            elif plan.kind is StepKind.PREFILL:
                record["lengths"] = lengths
                if any(cached):  # tokens found in the prefix cache (`pdserve plan profile` skips these steps)
                    record["cached"] = cached
            else:  # each sequence's (tokens cached before, tokens computed)
                assert plan.num_tokens is not None
                record["chunks"] = [[c, n] for c, n in zip(cached, plan.num_tokens, strict=True)]
            record.update(running_after=len(self.scheduler.running), seconds=round(elapsed, 6))
            self.step_log.write(record)
        self.metrics.generated_tokens.inc(len(outputs))

    def _deliver(self, out: StepOutput, step_ended: float) -> None:
        seq = out.seq
        job = self.jobs.get(seq.seq_id)
        if job is None:
            return
        produced = job.unsent
        if produced is None:
            produced = Produced([out.token_id], [])
        else:
            produced.token_ids.append(out.token_id)
        if job.prefill_started is not None and not job.prefilled:  # (a recompute after preemption is not a wait)
            job.prefilled = True
            produced.queue_seconds = job.prefill_started - job.enqueued_at
            produced.prefill_seconds = step_ended - job.prefill_started
        if seq.sampling.logprobs:
            produced.logprobs.append(out.logprob)
        if out.finish_reason:
            produced.finish_reason = out.finish_reason
            del self.jobs[seq.seq_id]
        # A request's first and last tokens go at once (TTFT and end-to-end latency as without
        # grouping); those between, every --stream-interval tokens.
        if out.finish_reason or len(produced.token_ids) >= self.stream_interval or seq.num_output_tokens == 1:
            job.unsent = None
            self._outgoing.append((job, produced))
        else:
            job.unsent = produced

    def _flush(self) -> None:
        """Engine thread: hands the step's chunks to the asyncio loop, all in one callback."""
        if self._outgoing:
            self.thread.emit(_dispatch, self._outgoing)
            self._outgoing = []

    def fail(self, plan: StepPlan, message: str) -> None:
        """Engine thread: the step's sequences end with INTERNAL `message`: out of the scheduler,
        blocks freed, streams told."""
        self.scheduler.fail_step(plan)
        for seq in plan.seqs:
            job = self.jobs.pop(seq.seq_id, None)
            if job is not None:  # one error each: every stream raises its own
                self._outgoing.append((job, ServiceError(grpc.StatusCode.INTERNAL, message)))
        self._flush()
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
    def start_job(self, start) -> StreamJob:
        """A request's job, from the `start` of a stream request; ServiceError if it is invalid."""
        raise NotImplementedError

    async def serve_call(self, requests, context: grpc.aio.ServicerContext) -> None:
        """One caller's call: starts and cancels its requests as they come, and writes what they
        produce, each step's chunks in one message, until the caller has closed its side and every
        request has ended. However the call ends, the requests still on it are cancelled: their
        sequences stop and their blocks are freed.

        A coroutine writing with context.write, not an async generator: when the caller goes away,
        grpc cancels this coroutine wherever it waits."""
        call = ServedCall(columns=COLUMNS_METADATA in (context.invocation_metadata() or ()))
        reader = asyncio.create_task(self._read_call(requests, call))
        try:
            while True:
                await call.ready.wait()
                call.ready.clear()
                if call.has_news():
                    await context.write(call.take())
                # (also after a write: the last chunk of a request cancelled just before the
                # caller closed its side sets nothing off again)
                if call.closed and not call.jobs and not call.has_news():
                    return
        finally:
            reader.cancel()
            for stream_id, job in list(call.jobs.items()):
                self.thread.post(partial(self.cancel, job))
                call.end(stream_id)

    async def _read_call(self, requests, call: ServedCall) -> None:
        try:
            async for request in requests:
                stream_id = request.stream_id
                if request.WhichOneof("kind") == "cancel":
                    job = call.end(stream_id)
                    if job is not None:
                        self.thread.post(partial(self.cancel, job))
                    continue
                try:
                    if stream_id in call.jobs:  # a caller's bug: both requests end, neither leaks
                        self.thread.post(partial(self.cancel, call.jobs[stream_id]))
                        raise invalid("stream_id", f"{stream_id} is a request in progress on this call")
                    if self.draining:
                        raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker is shutting down")
                    job = self.start_job(request.start)
                    # a decode worker's request has its KV (it is pulled); a colocated one's prompt waits
                    job.ticket = self.admission.admit(0 if job.handle is not None else len(job.seq.token_ids))
                except ServiceError as exc:
                    call.fail(stream_id, exc)
                    continue
                except Exception as exc:  # a bug here must fail this request, not the call's others
                    log.exception("request on stream %d could not start", stream_id)
                    call.fail(stream_id, ServiceError(grpc.StatusCode.INTERNAL, f"could not start: {exc!r}"))
                    continue
                job.stream_id, job.call = stream_id, call
                call.jobs[stream_id] = job
                self.thread.post(partial(self.submit, job))
        except grpc.aio.AioRpcError:
            pass  # the caller went away: serve_call is being cancelled too
        finally:
            call.closed = True
            call.ready.set()

    async def Stats(self, request, context) -> common_pb2.WorkerStats:
        stats = worker_stats(self.engine, self.role, self.node_id, self.model_name, self.not_serving_reason, request)
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


def _dispatch(outgoing: list[tuple[StreamJob, Produced | ServiceError]]) -> None:
    """Asyncio side: a step's chunks to their calls (a job cancelled meanwhile gets nothing more)."""
    for job, item in outgoing:
        call = job.call
        if call is not None and call.jobs.get(job.stream_id) is job:
            call.add(job.stream_id, item)


class ServedCall:
    """Asyncio side: one caller's call as the worker serves it (the router's end is
    router/worker_calls.WorkerCall), its requests in progress and what they produced but was
    not yet written: the next StreamUpdate (worker.proto). A request's plain next tokens go in its
    columns, kept here as lists until the write; anything more (an end, logprobs, timings) in one
    chunk per request, which that request's later tokens join."""

    def __init__(self, columns: bool = True) -> None:
        self.columns = columns  # the caller reads the update's columns (COLUMNS_METADATA)
        self.jobs: dict[int, StreamJob] = {}  # stream_id -> job, until its stream ends
        self.update = worker_pb2.StreamUpdate()
        self.pending: dict[int, worker_pb2.StreamChunk] = {}  # stream_id -> its chunk in self.update
        self.stream_ids: list[int] = []  # the columns of the next update
        self.token_counts: list[int] = []
        self.token_ids: list[int] = []
        self.ready = asyncio.Event()  # something to write, or the caller closed its side
        self.closed = False

    def has_news(self) -> bool:
        return bool(self.stream_ids or self.pending)

    def add(self, stream_id: int, item: Produced | ServiceError) -> None:
        if isinstance(item, ServiceError):
            self.fail(stream_id, item)
            return
        if (
            self.columns
            and stream_id not in self.pending
            and not (item.finish_reason or item.logprobs or item.queue_seconds or item.prefill_seconds)
        ):
            # (no timings: not the first token after a prefill here, so its ticket has no queued
            # prompt tokens left to give back)
            self.stream_ids.append(stream_id)
            self.token_counts.append(len(item.token_ids))
            self.token_ids += item.token_ids
            self.ready.set()
            return
        chunk = self._pending(stream_id).chunk
        chunk.token_ids.extend(item.token_ids)
        if item.logprobs:
            chunk.logprobs.extend(item.logprobs)
        if item.queue_seconds or item.prefill_seconds:
            chunk.queue_seconds, chunk.prefill_seconds = item.queue_seconds, item.prefill_seconds
        if item.finish_reason:
            chunk.finish_reason = item.finish_reason
            self.end(stream_id)
        else:
            ticket = self.jobs[stream_id].ticket
            if ticket is not None:
                ticket.prefilled()
        self.ready.set()

    def fail(self, stream_id: int, error: ServiceError) -> None:
        chunk = self._pending(stream_id)
        chunk.status_code, chunk.details = error.code.value[0], error.message
        self.end(stream_id)
        self.ready.set()

    def end(self, stream_id: int) -> StreamJob | None:
        """The request's stream is over (finished, failed or cancelled): its job, if it had one."""
        job = self.jobs.pop(stream_id, None)
        if job is not None and job.ticket is not None:
            job.ticket.release()
        return job

    def _pending(self, stream_id: int) -> worker_pb2.StreamChunk:
        chunk = self.pending.get(stream_id)
        if chunk is None:
            chunk = self.pending[stream_id] = self.update.chunks.add(stream_id=stream_id)
        return chunk

    def take(self) -> worker_pb2.StreamUpdate:
        update, self.update = self.update, worker_pb2.StreamUpdate()
        if self.stream_ids:
            update.stream_ids.extend(self.stream_ids)
            update.token_counts.extend(self.token_counts)
            update.token_ids.extend(self.token_ids)
            self.stream_ids, self.token_counts, self.token_ids = [], [], []
        self.pending = {}
        return update
