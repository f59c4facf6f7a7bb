"""Prefill worker: batches prompts FCFS up to a token budget, computes their KV and first token,
publishes the KV to the node's kvstore daemon and answers with the handle.

The batching policy is PrefillScheduler's. A published entry's blocks stay allocated until the
daemon reports them RELEASED (pulled by a decode worker, moved to its host tier after the TTL, or
released), so under a burst the prefill pool is the queue buffer and the batcher waits for blocks
rather than dropping work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.v1 import common_pb2, common_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.admission import Admission, refusals_counter
from services.common.background import in_background
from services.common.block_hashes import block_hashes
from services.common.enums import ReleaseReason, Role
from services.common.errors import ServiceError
from services.common.metrics import REQUEST_LATENCY_BUCKETS, TOKEN_COUNT_BUCKETS, TOKEN_LATENCY_BUCKETS
from services.engine.engine import EngineBase, StepOutput
from services.engine.scheduler import PrefillScheduler
from services.engine.sequence import Sequence
from services.kvstore.client import KvStoreClient
from services.runtime.engine_thread import EngineThread, reject, resolve
from services.runtime.step_log import StepLog
from services.runtime.worker import (
    PrefillRate,
    register_kv_gauges,
    register_kvstore_metrics,
    sequence_for,
    worker_stats,
)

log = logging.getLogger(__name__)


# After a prefix fetch that failed mid-copy (our deadline passed) the daemon may still write into
# its blocks until it notices: they return to the pool only after this long.
UNSETTLED_COPY_GRACE_SECONDS = 5.0


class FetchCost:
    """What fetching from a prefix tier costs here: the recent average of a fetch's seconds per
    block (its round trip included). A fetch pays when it costs less than computing the same tokens
    at the worker's measured prefill rate."""

    def __init__(self, alpha: float = 0.2, always: bool = False):
        self.alpha = alpha
        self.always = always  # --node-prefix-fetch always
        self.seconds_per_block = 0.0  # 0: not measured yet

    def observe(self, seconds: float, blocks: int) -> None:
        sample = seconds / blocks
        old = self.seconds_per_block
        self.seconds_per_block = sample if old == 0 else self.alpha * sample + (1 - self.alpha) * old

    def pays(self, blocks: int, compute_seconds: float) -> bool:
        if self.always or self.seconds_per_block == 0 or compute_seconds == 0:
            return True  # (nothing measured yet: try, and measure)
        return blocks * self.seconds_per_block < compute_seconds


class Outcome(StrEnum):
    """How a Prefill request ended (`pdserve_prefill_requests_total{outcome}`)."""

    PUBLISHED = "published"
    FINISHED = "finished"  # at its first token: nothing to publish
    CANCELLED = "cancelled"
    INVALID = "invalid"
    PUBLISH_FAILED = "publish_failed"
    FAILED = "failed"  # the engine step raised


@dataclass(eq=False)
class PrefillJob:
    seq: Sequence
    future: asyncio.Future  # the StepOutput of its prefill
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    compute_seconds: float = 0.0
    batch_size: int = 0


class PrefillMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.queue_requests = Gauge(
            "pdserve_prefill_queue_requests", "Requests waiting for a prefill batch.", registry=registry
        )
        self.queue_tokens = Gauge(
            "pdserve_prefill_queue_tokens", "Prompt tokens waiting for a prefill batch.", registry=registry
        )
        self.batch_tokens = Histogram(
            "pdserve_prefill_batch_tokens",
            "Prompt tokens per prefill batch.",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "pdserve_prefill_batch_requests",
            "Prompts per prefill batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.step_seconds = Histogram(
            "pdserve_prefill_step_duration_seconds",
            "Duration of one prefill batch's forward pass.",
            buckets=TOKEN_LATENCY_BUCKETS + (10.0, 30.0),
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "pdserve_prefill_queue_time_seconds",
            "Time a prompt waited for its batch.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.published = Gauge(
            "pdserve_prefill_published_entries",
            "KV entries published and not yet pulled or released.",
            registry=registry,
        )
        self.requests = Counter(
            "pdserve_prefill_requests_total", "Prefill requests by outcome.", ["outcome"], registry=registry
        )
        for outcome in Outcome:
            self.requests.labels(outcome)


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer, common_pb2_grpc.WorkerServicer):
    step_log: StepLog | None = None  # --step-log

    def __init__(
        self,
        engine: EngineBase,
        kvstore: KvStoreClient,
        *,
        worker_id: str,
        node_id: str,
        model_name: str,
        registry: CollectorRegistry,
        max_inflight_requests: int = 0,
        max_queued_prompt_tokens: int = 0,
        node_prefix_fetch: str = "measured",
    ):
        self.engine = engine
        # prefix caching and a one-rank pool: the node's prefix tier can fill this worker's cache
        self.node_prefix_tier = (
            engine.block_manager.prefix_caching and engine.config.ranks == 1 and node_prefix_fetch != "never"
        )
        self.fetch_cost = {tier: FetchCost(always=node_prefix_fetch == "always") for tier in ("node", "remote")}
        self.kvstore = kvstore
        self.worker_id = worker_id
        self.node_id = node_id
        self.model_name = model_name
        self.scheduler = PrefillScheduler(
            engine.block_manager, engine.config.max_num_batched_tokens, engine.config.max_num_seqs
        )
        self.metrics = PrefillMetrics(registry)
        register_kv_gauges(registry, engine, Role.PREFILL)
        register_kvstore_metrics(registry, kvstore)
        self.prefill_rate = PrefillRate()
        self.admission = Admission(
            "prefill worker", max_inflight_requests, max_queued_prompt_tokens, refusals_counter(registry)
        )
        self.jobs: dict[str, PrefillJob] = {}  # seq_id -> job waiting for its prefill, engine thread only
        self.draining = False
        self.thread = EngineThread("prefill-engine", self.step, self.scheduler.has_work)
        self.metrics.published.set_function(lambda: len(self.scheduler.published))

    @property
    def not_serving_reason(self) -> str:
        return self.kvstore.not_serving_reason

    async def start(self) -> None:
        self.thread.start(asyncio.get_running_loop())
        await self.kvstore.register_pool(self.worker_id, self.engine.instance_kv(), self._on_released)

    # ---- gRPC -----------------------------------------------------------------------------------
    async def Prefill(self, request: worker_pb2.PrefillRequest, context) -> None:
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "prefill worker is shutting down")
        try:
            seq = sequence_for(
                self.engine,
                request.request_id,
                "token_ids",
                request.token_ids,
                "resumed_output_ids",
                request.resumed_output_ids,
                request.sampling,
                cache_salt=request.cache_salt,
            )
        except ServiceError:
            self.metrics.requests.labels(Outcome.INVALID).inc()
            raise
        ticket = self.admission.admit(len(seq.token_ids))  # past a bound: RESOURCE_EXHAUSTED at once
        if self.node_prefix_tier:
            try:
                await self._fetch_prefix(seq, request.prefix_source)
            except BaseException:
                ticket.release()
                raise
        job = PrefillJob(seq, asyncio.get_running_loop().create_future())
        self.thread.post(lambda: self.submit(job))
        try:
            out: StepOutput = await job.future
        except asyncio.CancelledError:
            self.thread.post(lambda: self.cancel(job))
            self.metrics.requests.labels(Outcome.CANCELLED).inc()
            raise
        except ServiceError:
            self.metrics.requests.labels(Outcome.FAILED).inc()
            raise
        finally:
            ticket.release()  # computed (its published KV is bounded by the pool), failed or cancelled
        first = worker_pb2.PrefillResponse(
            first_token_id=out.token_id,
            first_logprob=out.logprob,
            finish_reason=out.finish_reason or "",
            queue_seconds=job.started_at - job.enqueued_at,
            compute_seconds=job.compute_seconds,
            batch_size=job.batch_size,
        )
        if out.finish_reason:  # done at the first token: nothing to publish (blocks already freed)
            self.metrics.requests.labels(Outcome.FINISHED).inc()
            await context.write(first)
            return
        kv_id = f"{self.worker_id}/{seq.seq_id}"  # unique: the sequence id is
        self.thread.post(lambda: self.scheduler.publish(kv_id, seq))
        # Not cancelled with the request: a Publish cut short may still be recorded by the daemon
        # after our Release found nothing, leaving an entry on blocks freed here.
        publish = asyncio.ensure_future(self.kvstore.publish(kv_id, list(seq.block_table), num_tokens=seq.num_cached))
        try:
            await context.write(first)  # the router has the first token while the KV is published
            try:
                handle = await asyncio.shield(publish)
            except grpc.aio.AioRpcError as exc:
                self.thread.post(lambda: self.scheduler.release(kv_id))
                self.metrics.requests.labels(Outcome.PUBLISH_FAILED).inc()
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"kvstore publish failed: {exc.details()}") from None
            if context.cancelled() or context.done():  # the router is gone: nobody will pull this entry
                in_background(self._abandon(kv_id))
                self.metrics.requests.labels(Outcome.CANCELLED).inc()
                return
            await context.write(worker_pb2.PrefillResponse(kv=handle))
        except ServiceError:
            raise
        except BaseException:  # the router went away (cancelled, or a write failed): nobody will pull it
            in_background(self._abandon(kv_id, publish))
            self.metrics.requests.labels(Outcome.CANCELLED).inc()
            raise
        self.metrics.requests.labels(Outcome.PUBLISHED).inc()

    async def Stats(self, request, context) -> common_pb2.WorkerStats:
        stats = worker_stats(self.engine, Role.PREFILL, self.node_id, self.model_name, self.not_serving_reason, request)
        stats.waiting = len(self.scheduler.waiting)
        stats.queued_prompt_tokens = self.scheduler.queued_tokens
        stats.prefill_seconds_per_token = self.prefill_rate.seconds_per_token
        stats.published_entries = len(self.scheduler.published)
        stats.draining = self.draining
        return stats

    # ---- engine thread ------------------------------------------------------------------------------
    def submit(self, job: PrefillJob) -> None:
        self.jobs[job.seq.seq_id] = job
        self.scheduler.add(job.seq)
        self._update_queue_gauges()

    def cancel(self, job: PrefillJob) -> None:
        self.jobs.pop(job.seq.seq_id, None)
        self.scheduler.abort(job.seq)
        self._update_queue_gauges()

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch:
            return
        jobs = [self.jobs.pop(seq.seq_id) for seq in batch]
        self._update_queue_gauges()
        started = time.monotonic()
        try:
            outputs, done_at = self.engine.prefill_pipelined(batch)
        except Exception as exc:
            log.exception("prefill of %d prompts failed", len(batch))
            for job in jobs:
                self.scheduler.finish(job.seq)
                self.thread.emit(
                    reject, job.future, ServiceError(grpc.StatusCode.INTERNAL, f"engine step failed: {exc!r}")
                )
            return
        busy = time.monotonic() - started  # until the next batch may start
        compute = max(busy, done_at - started)  # until this one's results are out
        tokens = sum(seq.num_cached - seq.prefix_hit_tokens for seq in batch)  # computed, not found cached
        self.prefill_rate.observe(busy, tokens)
        self.metrics.step_seconds.observe(compute)
        self.metrics.batch_tokens.observe(tokens)
        self.metrics.batch_requests.observe(len(batch))
        if self.step_log is not None:
            self.step_log.write(
                {
                    "t": round(started, 6),
                    "kind": "prefill",
                    "lengths": [s.num_cached for s in batch],
                    # tokens found in the prefix cache (`pdserve plan profile` skips these steps)
                    "cached": [s.prefix_hit_tokens for s in batch],
                    "seconds": round(compute, 6),
                }
            )
        for job, out in zip(jobs, outputs, strict=True):
            job.started_at, job.compute_seconds, job.batch_size = started, compute, len(batch)
            self.metrics.queue_seconds.observe(started - job.enqueued_at)
            if out.finish_reason:
                self.scheduler.finish(job.seq)
            self.thread.emit_at(started + compute, resolve, job.future, out)

    def _update_queue_gauges(self) -> None:
        self.metrics.queue_requests.set(len(self.scheduler.waiting))
        self.metrics.queue_tokens.set(self.scheduler.queued_tokens)

    # ---- asyncio side -------------------------------------------------------------------------
    async def _fetch_prefix(self, seq: Sequence, source: worker_pb2.PrefixSource) -> None:
        """Copies what a prefix tier holds of the sequence's prefix beyond this worker's own cache
        into that cache, when that takes less than computing it (FetchCost), so that the prefill
        computes only the rest: from this node's tier, or from another node's over UCX. The router
        says which tier holds how much (`source`: it saw the decode workers finish those requests).
        Best effort: on a failure the prefill computes it."""
        blocks, bs = self.engine.block_manager, self.engine.block_size
        wanted = min((len(seq.token_ids) - 1) // bs, source.num_blocks)
        if not wanted:
            return
        hashes = block_hashes(seq.token_ids[: wanted * bs], bs, seq.cache_salt)
        seq.block_hashes = list(hashes)  # (not on the engine thread yet: its admission goes on from these)
        local = await self.thread.call(lambda: blocks.cached_blocks(hashes))
        held = wanted - local
        if held <= 0:
            return
        tier, address = ("node", "") if source.node_id == self.node_id else ("remote", source.transfer_address)
        self.thread.post(lambda: blocks.count_lookup(tier, held * bs))
        cost = self.fetch_cost[tier]
        if not cost.pays(held, held * bs * self.prefill_rate.seconds_per_token):
            return
        hold = asyncio.ensure_future(self.thread.call(lambda: blocks.hold_for_fetch(hashes, held)))
        try:
            room = await asyncio.shield(hold)
        except asyncio.CancelledError:  # the engine thread holds the blocks all the same: give them back
            hold.add_done_callback(self._give_back_held)
            raise
        if room is None:
            return
        prefix, fresh = room
        first = len(prefix)  # (the cache may have changed meanwhile)
        got, settled = 0, False  # settled: the daemon writes no more into `fresh`
        started = time.monotonic()
        try:
            targets = hashes[first:wanted]
            response = await self.kvstore.fetch_prefix(targets, fresh[: len(targets)], address)
            got, settled = response.num_blocks, True
            # an emulated device's copy lasts what its profile says for the real bytes
            await asyncio.sleep(self.engine.min_transfer_seconds(got * bs) - (time.monotonic() - started))
            # (a fetch that found nothing cost its round trip: a block's worth)
            cost.observe(time.monotonic() - started, max(got, 1))
        except grpc.aio.AioRpcError as exc:
            got, settled = 0, exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
            log.debug("prefix fetch (%s) failed: %s", tier, exc.details())
        finally:
            if settled:
                self.thread.post(lambda: self._fetched(fresh, hashes[first : first + got], prefix))
            else:  # the daemon may still be writing them: out of use for a while
                self.thread.post(lambda: blocks.free(prefix))
                in_background(self._free_later(fresh))
        seq.fetched_blocks, seq.fetched_tier = (first, first + got), tier

    def _give_back_held(self, hold: asyncio.Future) -> None:
        if not hold.cancelled() and hold.exception() is None and hold.result() is not None:
            prefix, fresh = hold.result()
            self.thread.post(lambda: self.engine.block_manager.free(fresh + prefix))

    def _fetched(self, fresh: list[int], hashes: list[bytes], prefix: list[int]) -> None:
        """Engine thread: the fetched blocks enter the cache, the rest go back."""
        blocks = self.engine.block_manager
        blocks.enter_fetched(fresh[: len(hashes)], hashes)
        blocks.free(fresh[len(hashes) :] + prefix)

    async def _free_later(self, fresh: list[int]) -> None:
        await asyncio.sleep(UNSETTLED_COPY_GRACE_SECONDS)
        self.thread.post(lambda: self.engine.block_manager.free(fresh))

    def _on_released(self, kv_id: str, block_ids: list[int], reason: ReleaseReason) -> None:
        self.thread.post(lambda: self.scheduler.release(kv_id))

    async def _abandon(self, kv_id: str, publish: asyncio.Future | None = None) -> None:
        """Drops an entry nobody will pull, once its publish (if still running) has ended. The
        blocks are freed on the daemon's RELEASED event, or here if the daemon has no entry."""
        if publish is not None:
            try:
                await publish
            except Exception:
                pass
        try:
            released = await self.kvstore.release_own(kv_id)
        except grpc.aio.AioRpcError:
            released = False
        if not released:
            self.thread.post(lambda: self.scheduler.release(kv_id))

    # ---- shutdown -----------------------------------------------------------------------------
    async def drain(self) -> None:
        """Finish queued prompts; give published entries a chance to be pulled, then stop."""
        self.draining = True
        while self.jobs:
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 10
        while self.scheduler.published and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.kvstore.close()
        self.thread.stop()
