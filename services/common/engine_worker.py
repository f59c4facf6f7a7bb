"""What the three worker services (prefill, decode, colocated) share: engine flags, the engine
thread, request validation, and the Stats RPC.

The engine runs on its own thread so that the asyncio loop (gRPC, kvstore calls) stays responsive
while a forward pass runs (torch releases the GIL inside kernels). Every engine and block-manager
mutation happens on that thread: the asyncio side posts callables to its inbox.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import grpc
import torch

from pdserve.v1 import common_pb2
from services.engine import Engine, EngineConfig, SamplingParams
from services.engine.engine import default_threads

from .flags import FlagParser

log = logging.getLogger(__name__)


def add_engine_flags(parser: FlagParser) -> None:
    parser.add_flag("--model", default="", help="Hugging Face checkpoint folder (default: the embedded tiny model)")
    parser.add_flag("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_flag("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_flag("--block-size", default=16, type=int, help="tokens per KV block")
    parser.add_flag("--kv-cache-gb", default=0.0, type=float, help="KV pool size (0: from --gpu-memory-utilization on CUDA, 0.25 GiB on CPU)")
    parser.add_flag("--gpu-memory-utilization", default=0.85, type=float)
    parser.add_flag("--max-num-seqs", default=256, type=int, help="largest decode batch")
    parser.add_flag("--max-num-batched-tokens", default=8192, type=int, help="prefill token budget per batch (L_m)")
    parser.add_flag("--stream-interval", default=1, type=int,
                    help="decode and colocated workers: tokens per streamed message (the last goes at once)")
    parser.add_flag("--max-model-len", default=0, type=int, help="context limit (0: the model's)")
    parser.add_flag("--threads", default=0, type=int, help="torch CPU threads (0: all cores this process may use)")
    parser.add_flag("--node-id", default=os.uname().nodename, help="node name (Kubernetes: spec.nodeName)")
    parser.add_flag("--worker-id", default="", help="name in logs and kvstore (default: host:port)")
    parser.add_flag("--step-log", default="", help="append one JSON line per engine step to this file; "
                    "{worker} in it becomes the worker id (for `pdserve plan profile --step-log`)")


def resolve_model_dir(model: str) -> str:
    if model:
        return model
    from services.engine.testmodels import get_model

    return get_model("llama")


def engine_from_flags(args) -> Engine:
    torch.set_num_threads(args.threads or default_threads())  # the cores left to it by --cpu-affinity
    config = EngineConfig(
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb > 0 else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or None,
    )
    return Engine(resolve_model_dir(args.model), config)


class EngineThread:
    """Runs `step()` whenever `has_work()`, and callables posted from asyncio, on one thread."""

    def __init__(self, name: str, step: Callable[[], None], has_work: Callable[[], bool]):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._step = step
        self._has_work = has_work
        self._stopped = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread.start()

    def post(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)

    async def call(self, fn: Callable[[], object]):
        """Runs fn on the engine thread and returns its result (or raises its exception)."""
        future = self.loop.create_future()

        def run():
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                self.loop.call_soon_threadsafe(set_exception, future, exc)
            else:
                self.loop.call_soon_threadsafe(set_result, future, result)

        self.post(run)
        return await future

    def emit(self, fn: Callable[..., None], *args) -> None:
        """From the engine thread: runs fn(*args) on the asyncio loop."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopped:
                try:
                    fn = self._inbox.get(timeout=None if not self._has_work() else 0)
                    fn()
                    while True:
                        self._inbox.get_nowait()()
                except queue.Empty:
                    pass
                except Exception:  # a bad callable must not kill the worker
                    log.exception("engine thread task failed")
                if self._stopped:
                    break
                if self._has_work():
                    try:
                        self._step()
                    except Exception:
                        log.exception("engine step failed")
                        time.sleep(0.1)


def set_result(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class InvalidRequest(ValueError):
    """A request field is out of range; the message starts with the field's name."""


class StepFailed(RuntimeError):
    """An engine step raised: the requests in it fail with INTERNAL, their blocks freed, and the
    worker goes on serving (a failing step must not wedge the engine thread or leak KV)."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, error: BaseException):
        super().__init__(f"engine step failed: {error!r}")


def sampling_from_proto(sp: common_pb2.SamplingParams, *, default_max_tokens: int = 16) -> SamplingParams:
    """Validates and converts; raises InvalidRequest naming the field."""
    if sp.HasField("temperature") and not (0 <= sp.temperature <= 100):
        raise InvalidRequest(f"sampling.temperature: must be in [0, 100], got {sp.temperature}")
    if not (0 <= sp.top_p <= 1):
        raise InvalidRequest(f"sampling.top_p: must be in (0, 1], got {sp.top_p}")
    if sp.top_k < 0:
        raise InvalidRequest(f"sampling.top_k: must be >= 0, got {sp.top_k}")
    return SamplingParams(
        max_tokens=sp.max_tokens or default_max_tokens,
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_p=sp.top_p or 1.0,
        top_k=sp.top_k,
        seed=sp.seed if sp.HasField("seed") else 0,
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs,
    )


def validate_tokens(engine: Engine, field: str, token_ids, extra: int = 0) -> list[int]:
    tokens = list(token_ids)
    if not tokens:
        raise InvalidRequest(f"{field}: must contain at least one token")
    vocab = engine.model_config.vocab_size
    bad = next((t for t in tokens if t >= vocab), None)
    if bad is not None:
        raise InvalidRequest(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")
    if len(tokens) + extra >= engine.max_model_len:
        raise InvalidRequest(f"{field}: {len(tokens) + extra} tokens leave no room under max_model_len {engine.max_model_len}")
    return tokens


def validate_generation(engine: Engine, prompt_field: str, prompt_ids, output_field: str, output_ids,
                        sampling_proto, *, need_output: bool = False) -> tuple[list[int], list[int], SamplingParams]:
    """A prompt, the tokens generated for it so far, and its sampling, checked together (the
    resumed or already-generated tokens count against max_model_len and max_tokens)."""
    prompt = validate_tokens(engine, prompt_field, prompt_ids, extra=len(output_ids))
    outputs = list(output_ids)
    if need_output and not outputs:
        raise InvalidRequest(f"{output_field}: must hold at least the prefill's first token")
    if outputs:
        validate_tokens(engine, output_field, outputs, extra=len(prompt))
    sampling = sampling_from_proto(sampling_proto)
    if len(outputs) >= sampling.max_tokens:
        raise InvalidRequest(f"{output_field}: already as long as sampling.max_tokens")
    return prompt, outputs, sampling


class LoadStats:
    """A recent-average prefill cost per token, for the router's queue-delay estimate."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.seconds_per_token = 0.0

    def observe(self, seconds: float, tokens: int) -> None:
        if tokens <= 0:
            return
        sample = seconds / tokens
        self.seconds_per_token = sample if self.seconds_per_token == 0 else (
            self.alpha * sample + (1 - self.alpha) * self.seconds_per_token)


def register_kv_gauges(registry, engine: Engine, role: str) -> None:
    from prometheus_client import Gauge

    used = Gauge("pdserve_kv_blocks_used", "KV blocks in use in this worker's pool.", ["role"], registry=registry)
    used.labels(role).set_function(lambda: engine.block_manager.num_used)
    total = Gauge("pdserve_kv_blocks_total", "KV blocks in this worker's pool.", ["role"], registry=registry)
    total.labels(role).set_function(lambda: engine.block_manager.num_blocks)


def base_stats(engine: Engine, role: str, node_id: str, model_name: str) -> common_pb2.WorkerStats:
    bm = engine.block_manager
    return common_pb2.WorkerStats(
        role=role,
        model=model_name,
        node_id=node_id,
        kv_blocks_total=bm.num_blocks,
        kv_blocks_free=bm.num_free,
        block_size=engine.block_size,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.config.max_num_seqs,
        layout_fingerprint=engine.kv_pool.layout.fingerprint(),
    )


def worker_parser(description: str, *, port: int, metrics_port: int, kvstore: bool) -> FlagParser:
    from .flags import common_server_flags

    parser = FlagParser(description=description)
    common_server_flags(parser, port=port, metrics_port=metrics_port)
    add_engine_flags(parser)
    if kvstore:
        parser.add_flag("--kvstore", default="127.0.0.1:7100", help="gRPC address of this node's kvstore daemon")
    return parser


def run_worker(name: str, args, make_service, role_service: str) -> None:
    """Builds the engine, serves until SIGTERM, drains. `make_service(engine, registry, worker_id)`
    returns the servicer (async start() and drain()), which implements the role's service
    (`role_service`, e.g. "PrefillWorker" in worker.proto) and the Worker service (Stats)."""
    from pdserve.v1 import common_pb2_grpc, worker_pb2, worker_pb2_grpc

    def add_servicers(server, service):
        getattr(worker_pb2_grpc, f"add_{role_service}Servicer_to_server")(service, server)
        common_pb2_grpc.add_WorkerServicer_to_server(service, server)
        return [worker_pb2.DESCRIPTOR.services_by_name[role_service].full_name,
                common_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

    from .flags import setup_process
    from .metrics import new_registry
    from .server import ServiceRunner

    setup_process(args, name)

    async def main():
        engine = engine_from_flags(args)
        registry = new_registry()
        runner = ServiceRunner(name, args.host, args.port, args.metrics_port, registry, args.grace_seconds)
        worker_id = args.worker_id or f"{name}-{os.uname().nodename}-{args.port}"
        service = make_service(engine, registry, worker_id)
        if args.step_log:
            from .step_log import StepLog

            service.step_log = StepLog(args.step_log.replace("{worker}", worker_id))
        await service.start()
        await runner.start(lambda server: add_servicers(server, service))
        runner.install_signal_handlers()
        await runner.wait_and_drain(service.drain)
        engine.close()

    asyncio.run(main())
