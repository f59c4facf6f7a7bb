"""Decode worker: admits a request when it has blocks for its KV, has the node's kvstore daemon
pull the KV into those blocks, then runs it in the continuous batch and streams its tokens.

Admission is FCFS and pull-based (DistServe 4.4): a request waits here, holding nothing, until
blocks are free, so a burst of prefills queues in prefill memory rather than overflowing decode
memory. If a pull fails (the entry expired or its node is gone) the worker recomputes the KV
itself from the tokens it was sent, so the client's stream still completes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc

from pdserve.v1 import worker_pb2_grpc
from services.common.batching_worker import RECOMPUTE_REASONS, BatchingWorker, StreamJob, new_seq_id
from services.common.engine_worker import InvalidRequest, validate_generation
from services.engine import Sequence
from services.kvstore.client import KvStoreClient

log = logging.getLogger(__name__)

# Pull failures answered before any copy started: the destination blocks were never written.
SETTLED_PULL_FAILURES = ("not_found", "failed_precondition", "invalid_argument")


class DecodeService(BatchingWorker, worker_pb2_grpc.DecodeWorkerServicer):
    role = "decode"

    def __init__(self, engine, kvstore: KvStoreClient, *, worker_id: str, **kwargs):
        super().__init__(engine, **kwargs)
        self.kvstore = kvstore
        self.worker_id = worker_id
        self.admission: deque[StreamJob] = deque()  # engine thread: waiting for blocks
        self.pulling = 0
        # After a pull that failed mid-transfer (our deadline passed, the call broke off), the
        # daemon may still be writing into its blocks until it notices (it stops at its next
        # copy run, within milliseconds): they return to the pool only after this long.
        self.unsettled_pull_grace_seconds = 5.0
        self.quarantined_blocks = 0  # engine thread

    async def start(self) -> None:
        await super().start()
        # Decode blocks are never published, so nothing is ever released back to this pool.
        await self.kvstore.register_pool(self.worker_id, self.engine.kv_pool, lambda *_: None)

    async def Decode(self, request, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is shutting down")
        try:
            prompt, outputs, sampling = validate_generation(
                self.engine, "prompt_token_ids", request.prompt_token_ids, "output_token_ids",
                request.output_token_ids, request.sampling, need_output=True)
            if not request.kv.kv_id:
                raise InvalidRequest("kv.kv_id: a KV handle is required")
            cached = len(prompt) + len(outputs) - 1
            if request.kv.num_tokens != cached:
                raise InvalidRequest(f"kv.num_tokens: is {request.kv.num_tokens}, the tokens before the last are {cached}")
        except (InvalidRequest, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        fingerprint = self.engine.kv_pool.layout.fingerprint()
        if request.kv.layout_fingerprint != fingerprint:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"kv.layout_fingerprint: {request.kv.layout_fingerprint!r} does not match this "
                                f"worker's pool {fingerprint!r} (same model, dtype and block size needed)")
        seq = Sequence(seq_id=new_seq_id(request.request_id), token_ids=prompt + outputs,
                       num_prompt_tokens=len(prompt), sampling=sampling)
        job = self.new_job(request.request_id, seq)
        job.handle = request.kv
        self.thread.post(lambda: self._enqueue(job))
        await self.stream(job, context)

    # ---- engine thread ------------------------------------------------------------------------
    def _enqueue(self, job: StreamJob) -> None:
        self.jobs[job.seq.seq_id] = job
        self.admission.append(job)
        self._update_gauges()

    def _fits(self, job: StreamJob) -> bool:
        """Room for the job's KV now. Sequences preempted back to the scheduler's queue come
        first (as in vLLM): while any waits, nothing new is admitted, or a steady stream of
        arrivals would take every block they free and starve them. The watermark (blocks kept
        spare so that running sequences can grow) applies only while something else holds
        blocks: an idle worker admits any request its pool can hold."""
        if self.scheduler.waiting:
            return False
        in_flight = len(self.scheduler.running) + self.pulling
        need = self.engine.blocks_for_tokens(len(job.seq.token_ids))  # cached tokens + the next one
        spare = self.scheduler.watermark_blocks if in_flight else 0
        return in_flight < self.scheduler.max_num_seqs and need + spare <= self.engine.block_manager.num_free

    def _has_work(self) -> bool:
        # With blocks in quarantine and nothing running, a recompute that does not fit cannot be
        # stepped until they come back (the release is posted to the engine thread, waking it):
        # reporting work then would spin the engine thread for the whole grace period.
        waiting, running = self.scheduler.waiting, self.scheduler.running
        if self.quarantined_blocks and waiting and not running:
            need = self.engine.blocks_for_tokens(len(waiting[0].token_ids))
            if not self.engine.block_manager.can_allocate(need):
                return False
        return super()._has_work()

    def _has_pending_admissions(self) -> bool:
        return bool(self.admission) and self._fits(self.admission[0])

    def _admit(self) -> None:
        while self.admission and self._fits(self.admission[0]):
            job = self.admission.popleft()
            seq = job.seq
            self.engine.allocate(seq, num_tokens=len(seq.token_ids) - 1)
            job.state = "pulling"
            self.pulling += 1
            self.metrics.admission_wait.observe(time.monotonic() - job.enqueued_at)
            self.thread.emit(self._start_pull, job, list(seq.block_table))

    def _pulled(self, job: StreamJob, failure: str | None, code: str | None = None) -> None:
        """`failure` is the recompute reason (a bounded label), `code` the pull's own status."""
        self.pulling -= 1
        seq = job.seq
        if failure is not None and code not in SETTLED_PULL_FAILURES:
            self._quarantine(seq)  # the daemon may still be writing into its blocks
        if job.cancelled:
            self.engine.free(seq)
        elif failure is None:
            seq.num_cached = len(seq.token_ids) - 1
            job.state = "running"
            self.scheduler.add_running(seq)
        else:
            log.warning("request %s: KV pull failed (%s); recomputing it here", job.request_id, code or failure)
            self.metrics.recomputes.labels(failure).inc()
            self.engine.free(seq)
            job.state = "running"
            self.scheduler.add_prompt(seq)
        self._update_gauges()

    def _quarantine(self, seq: Sequence) -> None:
        blocks = self.engine.detach_blocks(seq)
        self.quarantined_blocks += len(blocks)
        self.thread.emit(self._release_quarantine_later, blocks)

    def _release_quarantined(self, blocks: list[int]) -> None:
        self.engine.free_blocks(blocks)
        self.quarantined_blocks -= len(blocks)

    def _forget_cancelled(self, job: StreamJob) -> None:
        if job in self.admission:
            self.admission.remove(job)
            self.thread.emit(self._release_entry, job.handle)  # nobody will pull it now

    # ---- asyncio side -------------------------------------------------------------------------
    def _start_pull(self, job: StreamJob, block_ids: list[int]) -> None:
        asyncio.create_task(self._pull(job, block_ids))

    async def _pull(self, job: StreamJob, block_ids: list[int]) -> None:
        code = None
        try:
            await self.kvstore.pull(block_ids, job.handle)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name.lower()
        except Exception:  # noqa: BLE001 - any failure falls back to recompute
            code = "other"
        failure = code if code in RECOMPUTE_REASONS or code is None else "other"  # a bounded label set
        self.thread.post(lambda: self._pulled(job, failure, code))

    def _release_quarantine_later(self, blocks: list[int]) -> None:
        asyncio.get_running_loop().call_later(self.unsettled_pull_grace_seconds, self.thread.post,
                                              lambda: self._release_quarantined(blocks))

    def _release_entry(self, handle) -> None:
        asyncio.create_task(self._release_entry_async(handle))

    async def _release_entry_async(self, handle) -> None:
        try:
            await self.kvstore.release(handle)
        except grpc.aio.AioRpcError as exc:
            log.debug("release of %s failed: %s", handle.kv_id, exc.details())

    async def drain(self) -> None:
        await super().drain()
        await self.kvstore.close()
