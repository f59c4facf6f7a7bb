"""python -m services.router --port 7000 --http-port 8000 --prefill HOST:PORT,... --decode HOST:PORT,...
[--prefill-dns NAME:PORT --decode-dns NAME:PORT] [--colocated ...] [--model DIR]"""

from __future__ import annotations

import asyncio
import logging
import sys

from pdserve.v1 import router_pb2, router_pb2_grpc
from services.common.admission import Admission, refusals_counter
from services.common.enums import WORKER_ROLES, Role
from services.common.flags import FlagParser, common_server_flags, setup_process
from services.common.metrics import new_registry
from services.common.server import ServiceRunner, run_event_loop
from services.engine.config import ModelConfig
from services.tiny_models import DEFAULT_SERVED_NAME, model_dir_or_default

from .openai_http import OpenAiServer
from .policies import PrefillPolicy
from .registry import RegistryMetrics, WorkerRegistry
from .server import RouterService
from .slo import SloTracker

log = logging.getLogger("router")


def _comma_list(values: list[str] | None) -> list[str]:
    """A repeatable flag's values, each possibly comma-separated, as one list."""
    return [a.strip() for v in values or [] for a in v.split(",") if a.strip()]


def api_keys(args) -> frozenset[str]:
    keys = set(_comma_list(args.api_key))
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys.update(line.strip() for line in f if line.strip() and not line.startswith("#"))
    if any(len(key) < 16 for key in keys):
        raise SystemExit("--api-key: keys must be at least 16 characters")
    return frozenset(keys)


def parser() -> FlagParser:
    p = FlagParser(description="pdserve router: the public gRPC API, and the OpenAI-compatible HTTP API")
    common_server_flags(p, port=7000, metrics_port=9000, reflection="on")
    p.add_flag(
        "--api-key",
        action="append",
        help="a key clients must send as metadata `authorization: Bearer <key>` (repeatable, or comma-separated "
        "in the environment); none: the API is open",
    )
    p.add_flag("--api-key-file", default="", help="a file of API keys, one per line (a Kubernetes Secret mounted)")
    p.add_flag(
        "--model", default="", help="checkpoint folder for the tokenizer and config (default: the embedded tiny model)"
    )
    p.add_flag("--max-model-len", default=0, type=int, help="context limit (0: the model's)")
    p.add_flag(
        "--served-model-name",
        default="",
        help="the model's name in both APIs (ListModels, the HTTP API's `model`); default: --model, or "
        "pdserve-tiny-llama for the embedded model",
    )
    p.add_flag(
        "--http-port",
        default=8000,
        type=int,
        help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health); "
        "-1: off",
    )
    p.add_flag(
        "--http-max-body-bytes",
        default=0,
        type=int,
        help="largest HTTP request body (413 past it); 0: what the longest prompt that fits the context needs",
    )
    for role in WORKER_ROLES:
        p.add_flag(f"--{role}", action="append", help=f"{role} worker addresses host:port, comma-separated")
        p.add_flag(
            f"--{role}-dns",
            action="append",
            help=f"DNS names host:port resolving to {role} workers (Kubernetes headless services)",
        )
    p.add_flag("--default-max-tokens", default=256, type=int, help="max_tokens when a request leaves it unset")
    p.add_flag("--slo-ttft-seconds", default=0.25, type=float, help="default TTFT SLO (DistServe chatbot 13B)")
    p.add_flag("--slo-tpot-seconds", default=0.1, type=float, help="default TPOT SLO (DistServe chatbot 13B)")
    p.add_flag("--slo-window-seconds", default=60.0, type=float, help="window of the attainment gauge")
    p.add_flag("--slo-attainment-target", default=0.9, type=float, help="attainment goal (DistServe: 90%%)")
    p.add_flag("--max-retries", default=2, type=int, help="failovers per request")
    p.add_flag(
        "--prefill-policy",
        default=PrefillPolicy.KV_AWARE,
        choices=list(PrefillPolicy),
        help="where prompts go (prefill or colocated workers): kv-aware weighs each worker's queue against the "
        "prompt's prefix it holds cached; least-loaded, the queue alone",
    )
    p.add_flag("--poll-interval", default=0.5, type=float, help="seconds between worker Stats polls")
    p.add_flag(
        "--shared-port",
        default=0,
        type=int,
        help="also serve on this port, shared with other routers of the cluster (SO_REUSEPORT): the kernel "
        "spreads client connections over them (`pdserve up --routers N`)",
    )
    p.add_flag(
        "--max-inflight-requests",
        default=2048,
        type=int,
        help="requests this router holds at once; past it, RESOURCE_EXHAUSTED at once (0: no bound)",
    )
    p.add_flag(
        "--max-queued-prompt-tokens",
        default=1 << 20,
        type=int,
        help="prompt tokens of its requests waiting for their first token; past it, RESOURCE_EXHAUSTED (0: no bound)",
    )
    p.add_flag(
        "--worker-wait-seconds",
        default=10.0,
        type=float,
        help="with no healthy worker of a role, how long a request waits for one before UNAVAILABLE",
    )
    p.add_flag(
        "--client-stall-seconds",
        default=10.0,
        type=float,
        help="cancel a request whose client has not taken a message for this long (its blocks are freed)",
    )
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_process(args, Role.ROUTER)
    static = {role: _comma_list(getattr(args, role)) for role in WORKER_ROLES}
    dns = {role: _comma_list(getattr(args, f"{role}_dns")) for role in WORKER_ROLES}
    roles = {r for r in static if static[r] or dns[r]}
    if roles not in ({Role.COLOCATED}, {Role.PREFILL, Role.DECODE}):
        raise SystemExit("give prefill and decode workers (disaggregated), or colocated workers alone")
    # Here, not at the top: transformers imports torch when it is installed (its RoPE utilities),
    # and the router's image has none; `--help` and a refused command line need neither. Where torch
    # is installed (a development machine, `pdserve up`), it is hidden from this process as the image
    # lacks it: the router uses only the tokenizer, and importing torch costs seconds at every start.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    from transformers import AutoTokenizer

    model_dir = model_dir_or_default(args.model)
    model_config = ModelConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    model_name = args.served_model_name or args.model or DEFAULT_SERVED_NAME

    keys = api_keys(args)

    async def run():
        registry = new_registry()
        workers = WorkerRegistry(static, dns, poll_interval=args.poll_interval, metrics=RegistryMetrics(registry))
        slo = SloTracker(
            registry, args.slo_ttft_seconds, args.slo_tpot_seconds, args.slo_window_seconds, args.slo_attainment_target
        )
        service = RouterService(
            workers,
            tokenizer,
            model_id=model_name,
            max_model_len=min(args.max_model_len or model_config.max_model_len, model_config.max_model_len),
            vocab_size=model_config.vocab_size,
            slo=slo,
            default_max_tokens=args.default_max_tokens,
            max_retries=args.max_retries,
            client_stall_seconds=args.client_stall_seconds,
            worker_wait_seconds=args.worker_wait_seconds,
            prefill_policy=PrefillPolicy(args.prefill_policy),
            metrics_registry=registry,
            admission=Admission(
                "router", args.max_inflight_requests, args.max_queued_prompt_tokens, refusals_counter(registry)
            ),
        )
        runner = ServiceRunner.from_flags(
            "router",
            args,
            registry,
            shared_port=args.shared_port,
            require_client_cert=False,  # the public API: clients authenticate with API keys
            api_keys=keys,
            protected_service=router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
        )

        def add(server):
            router_pb2_grpc.add_RouterServicer_to_server(service, server)
            return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

        def not_serving_reason() -> str:
            missing = [role for role in sorted(roles) if not workers.eligible(role)]
            return f"no healthy {' or '.join(missing)} worker" if missing else ""

        await runner.set_serving(False)
        await runner.start(add)
        http = None
        if args.http_port >= 0:
            http = OpenAiServer(
                service,
                model_name=model_name,
                api_keys=keys,
                not_serving_reason=not_serving_reason,
                max_body_bytes=args.http_max_body_bytes,
                registry=registry,
            )
            # several routers of a cluster share the HTTP port as they share the gRPC one
            await http.start(args.host, args.http_port, tls=runner.tls, reuse_port=bool(args.shared_port))
        runner.install_signal_handlers()
        await workers.start()

        async def drain() -> None:
            try:
                await service.drain()
            finally:  # (also when the grace period cuts the drain short)
                if http is not None:
                    await http.stop()

        watcher = asyncio.create_task(runner.follow_readiness(not_serving_reason, args.poll_interval))
        await runner.wait_and_drain(drain)
        watcher.cancel()

    run_event_loop(run())


if __name__ == "__main__":
    main()
