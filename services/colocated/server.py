"""Colocated worker: prefill and decode in one process, one continuous batch, prefill first or
(--chunked-prefill) prompt chunks beside the running sequences' tokens in every step. Served
through the same router API, for small deployments and as the baseline that disaggregation is
measured against."""

from __future__ import annotations

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.common.enums import Role
from services.engine.scheduler import BatchScheduler
from services.runtime.streaming import StreamingWorker, StreamJob
from services.runtime.worker import sequence_for


class ColocatedService(StreamingWorker, worker_pb2_grpc.ColocatedWorkerServicer):
    role = Role.COLOCATED
    scheduler_class = BatchScheduler

    def __init__(self, engine, *, chunked_prefill: bool = False, **kwargs):
        self.chunked_prefill = chunked_prefill
        super().__init__(engine, **kwargs)

    def new_scheduler(self) -> BatchScheduler:
        config = self.engine.config
        return BatchScheduler(
            self.engine.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.chunked_prefill
        )

    async def Generate(self, requests, context) -> None:
        await self.serve_call(requests, context)

    def start_job(self, request: worker_pb2.GenerateTokensRequest) -> StreamJob:
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
        return StreamJob(seq=seq, request_id=request.request_id)

    def enter(self, job: StreamJob) -> None:
        self.scheduler.add_prompt(job.seq)
