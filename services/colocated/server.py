"""Colocated worker: prefill and decode in one process, one continuous batch, prefill first
(vLLM's default policy). Served through the same router API, for small deployments and as the
baseline that disaggregation is measured against."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.common.enums import Role
from services.common.errors import ServiceError
from services.engine.engine import Engine
from services.engine.scheduler import BatchScheduler
from services.engine.sequence import Sequence
from services.runtime.streaming import StreamingWorker, StreamJob
from services.runtime.worker import new_seq_id, validate_generation


class ColocatedService(StreamingWorker, worker_pb2_grpc.ColocatedWorkerServicer):
    role = Role.COLOCATED

    def __init__(
        self, engine: Engine, *, node_id: str, model_name: str, registry: CollectorRegistry, stream_interval: int = 1
    ):
        scheduler = BatchScheduler(
            engine.block_manager, engine.config.max_num_seqs, engine.config.max_num_batched_tokens
        )
        super().__init__(
            engine,
            scheduler,
            node_id=node_id,
            model_name=model_name,
            registry=registry,
            stream_interval=stream_interval,
        )

    async def Generate(self, request: worker_pb2.GenerateTokensRequest, context) -> None:
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
        prompt, resumed, sampling = validate_generation(
            self.engine,
            "token_ids",
            request.token_ids,
            "resumed_output_ids",
            request.resumed_output_ids,
            request.sampling,
        )
        seq = Sequence(
            seq_id=new_seq_id(request.request_id),
            token_ids=prompt + resumed,
            num_prompt_tokens=len(prompt),
            sampling=sampling,
        )
        await self.submit_and_stream(self.new_job(request.request_id, seq), context)

    def enter(self, job: StreamJob) -> None:
        self.scheduler.add_prompt(job.seq)
