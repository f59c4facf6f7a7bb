"""Decode worker: admits a request when it has blocks for its KV, has the node's kvstore daemon
pull the KV into those blocks, then runs it in the continuous batch and streams its tokens.

The admission policy (FCFS, pull-based, DistServe 4.4) is DecodeScheduler's: a request waits
here, holding nothing, until blocks are free, so a burst of prefills queues in prefill memory
rather than overflowing decode memory. This file does the I/O: the pulls, and releasing entries
nobody will pull. If a pull fails (the entry expired or its node is gone) the worker recomputes
the KV itself from the tokens it was sent, so the client's stream still completes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.background import in_background
from services.common.block_hashes import block_hashes
from services.common.enums import Role
from services.common.errors import ServiceError, invalid
from services.common.metrics import REQUEST_LATENCY_BUCKETS
from services.engine.engine import EngineBase
from services.engine.scheduler import AbortOutcome, DecodeScheduler
from services.engine.sequence import Sequence, SequenceStatus
from services.kvstore.client import KvStoreClient
from services.runtime.streaming import StreamingWorker, StreamJob
from services.runtime.worker import register_kvstore_metrics, sequence_for

log = logging.getLogger(__name__)


class RecomputeReason(StrEnum):
    """Why KV was recomputed here instead of pulled: the failed pull's gRPC status (a bounded set)."""

    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    FAILED_PRECONDITION = "failed_precondition"
    INTERNAL = "internal"
    OTHER = "other"

    @classmethod
    def of(cls, code: grpc.StatusCode | None) -> RecomputeReason:
        name = code.name.lower() if code is not None else "other"
        return cls(name) if name in cls._value2member_map_ else cls.OTHER


# Pull failures answered before any copy started: the destination blocks were never written.
SETTLED_PULL_FAILURES = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
)


class DecodeService(StreamingWorker, worker_pb2_grpc.DecodeWorkerServicer):
    role = Role.DECODE
    scheduler_class = DecodeScheduler
    scheduler: DecodeScheduler

    def __init__(
        self,
        engine: EngineBase,
        kvstore: KvStoreClient,
        *,
        worker_id: str,
        node_id: str,
        model_name: str,
        registry: CollectorRegistry,
        stream_interval: int = 1,
        offer_prefixes: bool = True,
        **admission_limits: int,
    ):
        super().__init__(
            engine,
            node_id=node_id,
            model_name=model_name,
            registry=registry,
            stream_interval=stream_interval,
            **admission_limits,
        )
        self.kvstore = kvstore
        register_kvstore_metrics(registry, kvstore)
        self.worker_id = worker_id
        # After a pull that failed mid-transfer (our deadline passed, the call broke off), the
        # daemon may still be writing into its blocks until it notices (it stops at its next
        # copy run, within milliseconds): they return to the pool only after this long.
        self.unsettled_pull_grace_seconds = 5.0
        # finished requests' blocks go to the node's prefix tier (one-rank pools only)
        self.offer_prefixes = offer_prefixes and engine.config.ranks == 1
        self.admission_wait = Histogram(
            "pdserve_decode_admission_wait_seconds",
            "Time from a request's arrival until it was given KV blocks.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.recomputes = Counter(
            "pdserve_decode_kv_recomputes_total",
            "Requests whose KV was recomputed here because the pull failed.",
            ["reason"],
            registry=registry,
        )
        for reason in RecomputeReason:
            self.recomputes.labels(reason)

    @property
    def not_serving_reason(self) -> str:
        return self.kvstore.not_serving_reason

    async def start(self) -> None:
        await super().start()
        # Decode blocks are never published, so nothing is ever released back to this pool.
        await self.kvstore.register_pool(self.worker_id, self.engine.instance_kv(), lambda *_: None)

    async def Decode(self, requests, context) -> None:
        await self.serve_call(requests, context)

    def start_job(self, request: worker_pb2.DecodeRequest) -> StreamJob:
        seq = sequence_for(
            self.engine,
            request.request_id,
            "prompt_token_ids",
            request.prompt_token_ids,
            "output_token_ids",
            request.output_token_ids,
            request.sampling,
            need_output=True,
            cache_salt=request.cache_salt,
        )
        if not request.kv.kv_id:
            raise invalid("kv.kv_id", "a KV handle is required")
        cached = len(seq.token_ids) - 1
        if request.kv.num_tokens != cached:
            raise invalid("kv.num_tokens", f"is {request.kv.num_tokens}, the tokens before the last are {cached}")
        fingerprint = self.engine.instance_kv().layout.fingerprint()
        if request.kv.layout_fingerprint != fingerprint:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"kv.layout_fingerprint: {request.kv.layout_fingerprint!r} does not match this "
                f"worker's pool {fingerprint!r} (same model, dtype and block size needed)",
            )
        return StreamJob(seq=seq, request_id=request.request_id, handle=request.kv)

    async def Stats(self, request, context) -> common_pb2.WorkerStats:
        stats = await super().Stats(request, context)
        stats.kv_blocks_promised = self.scheduler.admission_blocks
        if self.offer_prefixes:  # routers point prefill workers at this node's prefix tier only then
            stats.kvstore_transfer_address = self.kvstore.transfer_address
        return stats

    # ---- engine thread ------------------------------------------------------------------------
    def enter(self, job: StreamJob) -> None:
        self.scheduler.add_request(job.seq)

    def before_step(self) -> None:
        for seq in self.scheduler.admit():
            job = self.jobs[seq.seq_id]
            self.admission_wait.observe(time.monotonic() - job.enqueued_at)
            self.thread.spawn(self._pull(job, list(seq.block_table)))

    def _pulled(self, job: StreamJob, error: grpc.StatusCode | None) -> None:
        if error is None:
            self.scheduler.pull_succeeded(job.seq)
        else:
            if job.seq.status is SequenceStatus.PULLING:  # (not cancelled meanwhile)
                log.warning("request %s: KV pull failed (%s); recomputing it here", job.request_id, error.name)
                self.recomputes.labels(RecomputeReason.of(error)).inc()
            quarantined = self.scheduler.pull_failed(job.seq, blocks_may_be_written=error not in SETTLED_PULL_FAILURES)
            if quarantined:
                self.thread.spawn(self._release_later(quarantined))
            if error is not grpc.StatusCode.NOT_FOUND and job.handle is not None:  # nobody will pull it now
                self.thread.spawn(self._release_entry(job.handle))
        self._update_gauges()

    def finishing(self, seqs: list[Sequence]) -> None:
        """Offers each finished sequence's full computed blocks (its prompt and its answer, but the
        last token, never fed) to the node's prefix tier; they stay held until the daemon has them."""
        if not self.offer_prefixes:
            return
        for seq in seqs:
            blocks = seq.block_table[: seq.num_cached // self.engine.block_size]
            if blocks:
                self.engine.block_manager.share(blocks)
                self.thread.spawn(self._offer(seq.token_ids[: seq.num_cached], seq.cache_salt, blocks))

    def aborted(self, job: StreamJob, outcome: AbortOutcome) -> None:
        if outcome is AbortOutcome.NOT_ADMITTED and job.handle is not None:
            self.thread.spawn(self._release_entry(job.handle))  # nobody will pull it now

    # ---- asyncio side -------------------------------------------------------------------------
    async def _pull(self, job: StreamJob, block_ids: list[int]) -> None:
        assert job.handle is not None
        error: grpc.StatusCode | None = None
        started = time.monotonic()
        try:
            await self.kvstore.pull(block_ids, job.handle)
            # an emulated device's transfer lasts what its profile says for the real bytes
            await asyncio.sleep(self.engine.min_transfer_seconds(job.handle.num_tokens) - (time.monotonic() - started))
        except grpc.aio.AioRpcError as exc:
            error = exc.code()
        except Exception:
            log.exception("request %s: KV pull failed", job.request_id)
            error = grpc.StatusCode.UNKNOWN
        self.thread.post(lambda: self._pulled(job, error))

    async def _offer(self, token_ids: list[int], salt: str, blocks: list[int]) -> None:
        settled = False  # the daemon reads the blocks no more
        try:
            await self.kvstore.offer_prefix(blocks, block_hashes(token_ids, self.engine.block_size, salt))
            settled = True
        except grpc.aio.AioRpcError as exc:
            settled = exc.code() in SETTLED_PULL_FAILURES
            log.debug("offer to the prefix tier failed: %s", exc.details())
        finally:
            if settled:
                self.thread.post(lambda: self.engine.block_manager.free(blocks))
            else:  # a copy broken off may still be reading them
                in_background(self._free_later(blocks))

    async def _free_later(self, blocks: list[int]) -> None:
        await asyncio.sleep(self.unsettled_pull_grace_seconds)
        self.thread.post(lambda: self.engine.block_manager.free(blocks))

    async def _release_later(self, blocks: list[int]) -> None:
        await asyncio.sleep(self.unsettled_pull_grace_seconds)
        self.thread.post(lambda: self.scheduler.release_quarantined(blocks))

    async def _release_entry(self, handle: common_pb2.KvHandle) -> None:
        try:
            await self.kvstore.release(handle)
        except grpc.aio.AioRpcError as exc:
            log.debug("release of %s failed: %s", handle.kv_id, exc.details())

    async def drain(self) -> None:
        await super().drain()
        await self.kvstore.close()
