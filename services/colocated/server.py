"""Colocated worker: prefill and decode in one process, one continuous batch, prefill first
(vLLM's default policy). Served through the same router API, for small deployments and as the
baseline that disaggregation is measured against."""

from __future__ import annotations

import grpc

from pdserve.v1 import worker_pb2_grpc
from services.common.batching_worker import BatchingWorker, StreamJob, new_seq_id
from services.common.engine_worker import InvalidRequest, validate_generation
from services.engine import Sequence


class ColocatedService(BatchingWorker, worker_pb2_grpc.ColocatedWorkerServicer):
    role = "colocated"

    async def Generate(self, request, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
        try:
            prompt, resumed, sampling = validate_generation(
                self.engine, "token_ids", request.token_ids, "resumed_output_ids", request.resumed_output_ids,
                request.sampling)
        except (InvalidRequest, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        seq = Sequence(seq_id=new_seq_id(request.request_id), token_ids=prompt + resumed,
                       num_prompt_tokens=len(prompt), sampling=sampling)
        job = self.new_job(request.request_id, seq)
        self.thread.post(lambda: self._enqueue(job))
        await self.stream(job, context)

    def _enqueue(self, job: StreamJob) -> None:
        self.jobs[job.seq.seq_id] = job
        self.scheduler.add_prompt(job.seq)
        self._update_gauges()
