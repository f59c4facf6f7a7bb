"""Colocated worker: prefill and decode in one process, one continuous batch, prefill first
(vLLM's default policy). Served through the same router API, for small deployments and as the
baseline that disaggregation is measured against."""

from __future__ import annotations

import grpc

from pdserve.v1 import worker_pb2_grpc
from services.common.batching_worker import BatchingWorker, StreamJob, new_seq_id
from services.common.engine_worker import InvalidRequest, sampling_from_proto, validate_tokens
from services.engine import Sequence


class ColocatedService(BatchingWorker, worker_pb2_grpc.ColocatedWorkerServicer):
    role = "colocated"

    async def Generate(self, request, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
        try:
            prompt = validate_tokens(self.engine, "token_ids", request.token_ids, extra=len(request.resumed_output_ids))
            resumed = list(request.resumed_output_ids)
            if resumed:
                validate_tokens(self.engine, "resumed_output_ids", resumed, extra=len(prompt))
            sampling = sampling_from_proto(request.sampling)
            if len(resumed) >= sampling.max_tokens:
                raise InvalidRequest("resumed_output_ids: already as long as sampling.max_tokens")
        except (InvalidRequest, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        seq = Sequence(seq_id=new_seq_id(request.request_id), token_ids=prompt + resumed,
                       num_prompt_tokens=len(prompt), sampling=sampling)
        job = self.new_job(request.request_id, seq)
        self.thread.post(lambda: self._enqueue(job))
        async for chunk in self.stream(job, context):
            yield chunk

    def _enqueue(self, job: StreamJob) -> None:
        self.jobs[job.seq.seq_id] = job
        self.scheduler.add_prompt(job.seq)
        self._update_gauges()
