"""A worker process: its flags, its engine, its Stats answer, and the run loop from start to drain.

python -m services.{prefill,decode,colocated}  ->  run_worker(role, args, make_service)
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
import torch
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.v1 import common_pb2, common_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common import validation
from services.common.enums import Role
from services.common.flags import FlagParser, common_server_flags, setup_process
from services.common.latency_profile import LatencyProfile
from services.common.metrics import new_registry
from services.common.server import ServiceRunner, run_event_loop
from services.common.tls import TlsFiles, socket_context
from services.engine.block_manager import PREFIX_TIERS
from services.engine.config import BACKENDS, EngineConfig, SamplingParams
from services.engine.emulated import DEFAULT_KV_SCALE, EmulatedEngine
from services.engine.engine import Engine, EngineBase
from services.engine.sequence import Sequence
from services.kvstore.client import KvStoreClient
from services.tiny_models import model_dir_or_default

from .engine_thread import EngineThread
from .step_log import StepLog

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # when a request to a worker leaves sampling.max_tokens unset (the router never does)
ROLE_SERVICES = {Role.PREFILL: "PrefillWorker", Role.DECODE: "DecodeWorker", Role.COLOCATED: "ColocatedWorker"}


# ---- flags ---------------------------------------------------------------------------------------
def worker_parser(role: Role, description: str, *, port: int, metrics_port: int) -> FlagParser:
    parser = FlagParser(description=description)
    common_server_flags(parser, port=port, metrics_port=metrics_port)
    parser.add_flag("--model", default="", help="Hugging Face checkpoint folder (default: the embedded tiny model)")
    parser.add_flag("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_flag(
        "--device", default="cpu", help="cpu, cuda[:N], or emulated: no model, each step takes the time --profile says"
    )
    parser.add_flag(
        "--profile",
        default="",
        help="--device emulated: the latency profile (pdserve.profile/v1 JSON) of the emulated instance",
    )
    parser.add_flag(
        "--emulated-kv-scale",
        default=DEFAULT_KV_SCALE,
        type=int,
        help="--device emulated: the KV pool holds the profile's bytes per token divided by this",
    )
    parser.add_flag(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="how the model runs: auto (triton on CUDA, the CPU kernels for float32 where they build), "
        "torch (the reference), cpu-kernels, triton",
    )
    parser.add_flag("--block-size", default=16, type=int, help="tokens per KV block")
    parser.add_flag(
        "--kv-cache-gb",
        default=0.0,
        type=float,
        help="KV pool size (0: from --gpu-memory-utilization on CUDA, 0.25 GiB on CPU)",
    )
    parser.add_flag("--gpu-memory-utilization", default=0.85, type=float)
    parser.add_flag("--max-num-seqs", default=256, type=int, help="largest decode batch")
    parser.add_flag("--max-num-batched-tokens", default=8192, type=int, help="prefill token budget per batch (L_m)")
    parser.add_flag("--max-model-len", default=0, type=int, help="context limit (0: the model's)")
    parser.add_flag("--threads", default=0, type=int, help="torch CPU threads (0: all cores this process may use)")
    parser.add_flag(
        "--tensor-parallel",
        default=1,
        type=int,
        help="ranks per pipeline stage of this instance, the model's heads and MLP split among them, one "
        "process each (on CUDA one GPU each, from --device on); --threads are shared out among all ranks, "
        "--kv-cache-gb is each rank's",
    )
    parser.add_flag(
        "--pipeline-parallel",
        default=1,
        type=int,
        help="pipeline stages of this instance, the model's layers split among them (each stage "
        "--tensor-parallel ranks)",
    )
    parser.add_flag(
        "--pipeline-micro-batches",
        default=1,
        type=int,
        help="micro-batches a decode step is cut into on a pipeline, so that stages overlap (1: none; 0: one "
        "per stage); each costs a pass over the stage's weights (docs/benchmarks.md, bench/pipeline.py)",
    )
    parser.add_flag(
        "--ranks-share-gpu",
        default=False,
        action="store_true",
        help="every rank of this instance on --device itself, collectives over gloo through host memory (slow): "
        "to check a parallel layout's outputs on fewer GPUs than ranks",
    )
    parser.add_flag(
        "--pods",
        default=1,
        type=int,
        help="hosts (pods) the instance's ranks are spread over, whole pipeline stages each: this worker runs "
        "the first pod's; each other pod runs `python -m services.engine.follower --leader HOST:PORT --pod J`",
    )
    parser.add_flag(
        "--rendezvous-port",
        default=29500,
        type=int,
        help="with --pods > 1: where this worker (on --host) waits for the other pods' followers; the ranks' "
        "process-group store listens on the next port",
    )
    parser.add_flag("--node-id", default=os.uname().nodename, help="node name (Kubernetes: spec.nodeName)")
    parser.add_flag("--worker-id", default="", help="name in logs and kvstore (default: role-host-port)")
    parser.add_flag(
        "--step-log",
        default="",
        help="append one JSON line per engine step to this file; "
        "{worker} in it becomes the worker id (for `pdserve plan profile --step-log`)",
    )
    # every role takes it, so that one set of flags (pdserve up --worker-arg) serves them all
    parser.add_flag(
        "--stream-interval",
        default=1,
        type=int,
        help="decode and colocated workers: tokens per streamed message (the last goes at once)",
    )
    parser.add_flag(
        "--max-inflight-requests",
        default=1024,
        type=int,
        help="requests this worker holds at once (prefill: waiting for their batch; decode, colocated: "
        "running or waiting); past it, RESOURCE_EXHAUSTED at once and the router tries another worker (0: no bound)",
    )
    parser.add_flag(
        "--max-queued-prompt-tokens",
        default=1 << 18,
        type=int,
        help="prefill, colocated: prompt tokens waiting to be computed; past it, RESOURCE_EXHAUSTED (0: no bound)",
    )
    parser.add_flag(
        "--no-prefix-caching",
        default=False,
        action="store_true",
        help="compute every prompt whole: a prefill or colocated worker keeps no computed blocks for later prompts "
        "with the same prefix and fetches none from its node's prefix tier; a decode worker offers none to it",
    )
    parser.add_flag(
        "--node-prefix-fetch",
        default="measured",
        choices=["measured", "always", "never"],
        help="prefill workers: fetch a prompt's prefix from a prefix tier (this node's, or the one the router names) "
        "only when the measured cost of a fetch is below that of computing it (measured), whenever a tier holds "
        "more of it than this worker (always), or not at all (never: this worker's own cache only)",
    )
    if role in (Role.PREFILL, Role.DECODE):
        parser.add_flag("--kvstore", default="127.0.0.1:7100", help="gRPC address of this node's kvstore daemon")
    return parser


def engine_from_flags(args, role: Role) -> EngineBase:
    torch.set_num_threads(args.threads or default_threads())  # the cores left to it by --cpu-affinity
    if (args.device == "emulated") != bool(args.profile):
        raise SystemExit("--profile goes with --device emulated, and --device emulated needs a --profile")
    config = EngineConfig(
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        block_size=args.block_size,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb > 0 else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or None,
        tensor_parallel=args.tensor_parallel,
        pipeline_parallel=args.pipeline_parallel,
        pipeline_micro_batches=args.pipeline_micro_batches,
        ranks_share_device=args.ranks_share_gpu,
        pods=args.pods,
        rendezvous=f"{args.host}:{args.rendezvous_port}" if args.pods > 1 else "",
        enable_prefix_caching=role is not Role.DECODE and not args.no_prefix_caching,
    )
    if args.device == "emulated":
        if config.ranks > 1:
            raise SystemExit(
                "--tensor-parallel, --pipeline-parallel: an emulated instance's parallelism is its profile's"
            )
        return EmulatedEngine(
            model_dir_or_default(args.model), config, LatencyProfile.load(args.profile), args.emulated_kv_scale
        )
    tls = TlsFiles.from_args(args)
    rendezvous_tls = socket_context(tls, server=True) if tls is not None and config.pods > 1 else None
    return Engine(model_dir_or_default(args.model), config, rendezvous_tls=rendezvous_tls)


def admission_limits(args) -> dict[str, int]:
    """The services' keyword arguments for their admission bounds (services/common/admission.py)."""
    return {
        "max_inflight_requests": args.max_inflight_requests,
        "max_queued_prompt_tokens": args.max_queued_prompt_tokens,
    }


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


# ---- what every worker answers and reports ---------------------------------------------------------
def limits_of(engine: EngineBase) -> validation.ModelLimits:
    return validation.ModelLimits(engine.model_config.vocab_size, engine.max_model_len)


def sampling_params(sp: common_pb2.SamplingParams) -> SamplingParams:
    """A validated request's sampling (validation.sampling) for the engine."""
    return SamplingParams(
        max_tokens=sp.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_p=sp.top_p or 1.0,
        top_k=sp.top_k,
        seed=sp.seed if sp.HasField("seed") else 0,
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs,
        min_tokens=sp.min_tokens,
    )


def sequence_for(
    engine: EngineBase,
    request_id: str,
    prompt_field: str,
    prompt_ids,
    output_field: str,
    output_ids,
    sp: common_pb2.SamplingParams,
    *,
    need_output: bool = False,
    cache_salt: str = "",
) -> Sequence:
    """A request, validated (common/validation.py), as the engine's Sequence: its prompt followed by
    the tokens generated for it so far, under an id of its own."""
    validation.request_id("request_id", request_id)
    sampling = sampling_params(sp)
    prompt, outputs = validation.generation(
        limits_of(engine),
        prompt_field,
        prompt_ids,
        output_field,
        output_ids,
        sp,
        max_tokens=sampling.max_tokens,
        need_output=need_output,
    )
    return Sequence(
        seq_id=new_seq_id(request_id),
        token_ids=prompt + outputs,
        num_prompt_tokens=len(prompt),
        sampling=sampling,
        cache_salt=validation.cache_salt("cache_salt", cache_salt),
    )


def new_seq_id(request_id: str) -> str:
    """Engine state is keyed by sequence id; request ids come from clients and may repeat."""
    return f"{request_id}#{uuid.uuid4().hex[:8]}"


class PrefillRate:
    """A recent average of prefill seconds per token, for the router's queue-delay estimate."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.seconds_per_token = 0.0

    def observe(self, seconds: float, tokens: int) -> None:
        if tokens <= 0:
            return
        sample = seconds / tokens
        self.seconds_per_token = (
            sample if self.seconds_per_token == 0 else (self.alpha * sample + (1 - self.alpha) * self.seconds_per_token)
        )


def register_kv_gauges(registry: CollectorRegistry, engine: EngineBase, role: Role) -> None:
    used = Gauge("pdserve_kv_blocks_used", "KV blocks in use in this worker's pool.", ["role"], registry=registry)
    used.labels(role).set_function(lambda: engine.block_manager.num_used)
    total = Gauge("pdserve_kv_blocks_total", "KV blocks in this worker's pool.", ["role"], registry=registry)
    total.labels(role).set_function(lambda: engine.block_manager.num_blocks)
    if isinstance(engine, EmulatedEngine):
        registry.register(_EmulationCollector(engine))
    if engine.block_manager.prefix_caching:
        registry.register(_PrefixCacheCollector(engine))


def register_kvstore_metrics(registry: CollectorRegistry, kvstore: KvStoreClient) -> None:
    registry.register(_KvStoreRegistrationCollector(kvstore))


class _KvStoreRegistrationCollector(Collector):
    """Whether this worker's pool is registered with its node's kvstore daemon, and how often that
    was lost and regained (a daemon restart)."""

    def __init__(self, kvstore: KvStoreClient):
        self.kvstore = kvstore

    def collect(self):
        yield GaugeMetricFamily(
            "pdserve_kvstore_registered",
            "1 while this worker's KV pool is registered with its node's kvstore daemon (it takes work only then).",
            1 if self.kvstore.registered else 0,
        )
        yield CounterMetricFamily(
            "pdserve_kvstore_registrations",
            "Times this worker's pool was registered with the kvstore daemon (the first, then after each loss).",
            self.kvstore.registrations,
        )
        yield CounterMetricFamily(
            "pdserve_kvstore_registrations_lost",
            "Times this worker lost its kvstore registration (the daemon stopped or restarted).",
            self.kvstore.registrations_lost,
        )


class _PrefixCacheCollector(Collector):
    """Prefix caching (engine/block_manager.py): tokens looked up and found, by tier: in the worker's
    own pool ("worker"), in its node's prefix tier ("node": a prefill worker fetches from it)."""

    def __init__(self, engine: EngineBase):
        self.blocks = engine.block_manager

    def collect(self):
        queries = CounterMetricFamily(
            "pdserve_prefix_cache_queries_tokens",
            "Tokens of prompts looked up in the prefix cache (every prompt token, the last included).",
            labels=["tier"],
        )
        hits = CounterMetricFamily(
            "pdserve_prefix_cache_hit_tokens",
            "Prompt tokens whose K/V was found in the prefix cache, by where it was found.",
            labels=["tier"],
        )
        for tier in PREFIX_TIERS:
            queries.add_metric([tier], self.blocks.prefix_query_tokens[tier])
            hits.add_metric([tier], self.blocks.prefix_hit_tokens[tier])
        yield queries
        yield hits
        yield GaugeMetricFamily(
            "pdserve_prefix_cache_blocks", "KV blocks holding a cached prefix (in use or free).", self.blocks.num_cached
        )
        yield CounterMetricFamily(
            "pdserve_prefix_cache_evicted_blocks",
            "Cached blocks evicted (reused for other K/V) because no free block was uncached.",
            self.blocks.prefix_evicted_blocks,
        )


class _EmulationCollector(Collector):
    """An emulated engine's steps, and those that ran later than its profile says (emulated.py)."""

    def __init__(self, engine: EmulatedEngine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("pdserve_emulated_steps", "Engine steps of this emulated engine.", self.engine.steps)
        yield CounterMetricFamily(
            "pdserve_emulated_late_steps",
            "Emulated steps that ended over 1 ms later than the profile's time (the machine's cores were too busy).",
            self.engine.late_steps,
        )
        yield CounterMetricFamily(
            "pdserve_emulated_late_seconds",
            "Seconds by which emulated steps ran past the profile's time, in all.",
            self.engine.late_seconds,
        )


def worker_stats(
    engine: EngineBase,
    role: Role,
    node_id: str,
    model_name: str,
    not_serving_reason: str,
    request: common_pb2.StatsRequest | None = None,
) -> common_pb2.WorkerStats:
    """The fields every role fills; each service adds its queue."""
    bm = engine.block_manager
    prefix_cache = None
    if bm.prefix_caching:
        events = bm.cache_events
        cursor = events.cursor  # read first: what the changes below may miss, the next answer has
        since = events.since(request.prefix_log_id, request.prefix_cursor) if request is not None else None
        if since is None:
            prefix_cache = common_pb2.PrefixCacheUpdate(
                log_id=events.log_id, cursor=cursor, snapshot=True, stored=bm.cached_hashes()
            )
        else:
            prefix_cache = common_pb2.PrefixCacheUpdate(
                log_id=events.log_id, cursor=cursor, stored=since[0], removed=since[1]
            )
    return common_pb2.WorkerStats(
        prefix_cache=prefix_cache,
        not_serving_reason=not_serving_reason,
        role=role,
        model=model_name,
        node_id=node_id,
        kv_blocks_total=bm.num_blocks,
        kv_blocks_free=bm.num_free,
        block_size=engine.block_size,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.config.max_num_seqs,
        layout_fingerprint=engine.instance_kv().layout.fingerprint(),
    )


# ---- the process -----------------------------------------------------------------------------------
class WorkerService(Protocol):
    """What run_worker needs of a worker's servicer (besides implementing its gRPC services)."""

    step_log: StepLog | None
    thread: EngineThread

    @property
    def not_serving_reason(self) -> str: ...  # "" when it can take work

    async def start(self) -> None: ...

    async def drain(self) -> None: ...


class ServiceFactory(Protocol):
    def __call__(self, engine: EngineBase, registry: CollectorRegistry, worker_id: str) -> WorkerService: ...


def add_worker_servicers(server: grpc.aio.Server, role: Role, service: object) -> list[str]:
    """Registers a worker's servicer for its role's service (worker.proto) and the Worker service
    (Stats); returns their full names (for health and reflection)."""
    name = ROLE_SERVICES[role]
    getattr(worker_pb2_grpc, f"add_{name}Servicer_to_server")(service, server)
    common_pb2_grpc.add_WorkerServicer_to_server(service, server)
    return [
        worker_pb2.DESCRIPTOR.services_by_name[name].full_name,
        common_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
    ]


def run_worker(role: Role, args, make_service: ServiceFactory) -> None:
    """Builds the engine, serves until SIGTERM, drains."""
    setup_process(args, role)

    async def main() -> None:
        engine = engine_from_flags(args, role)
        registry = new_registry()
        runner = ServiceRunner.from_flags(role, args, registry)
        worker_id = args.worker_id or f"{role}-{os.uname().nodename}-{args.port}"
        try:
            service = make_service(engine, registry, worker_id)
        except ValueError as exc:  # flags the service refuses (the engine's pool must not outlive us)
            engine.close()
            raise SystemExit(f"{role}: {exc}") from None
        if args.step_log:
            service.step_log = StepLog(args.step_log.replace("{worker}", worker_id))

        def housekeeping(trim: Callable[[], None]) -> None:  # between requests (common/memory.py)
            def run() -> None:
                engine.release_idle_memory()
                trim()

            service.thread.post_when_idle(run)

        runner.run_housekeeping = housekeeping
        # Serving (NOT_SERVING, Stats saying why) while start() waits for this node's kvstore
        # daemon: a worker started before its daemon waits for it instead of exiting.
        await runner.set_serving(False)
        await runner.start(lambda server: add_worker_servicers(server, role, service))
        runner.install_signal_handlers()
        readiness = None
        if await runner.unless_stopped(service.start()):
            readiness = asyncio.create_task(runner.follow_readiness(lambda: service.not_serving_reason, 0.1))
        drain: Callable[[], Awaitable[None]] = service.drain
        await runner.wait_and_drain(drain)
        if readiness is not None:
            readiness.cancel()
        engine.close()

    run_event_loop(main())
