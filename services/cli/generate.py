"""`pdserve generate`: stream one request through a running router and print text and timings."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.common.commands import at_least


def add_generate_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("prompt")
    ap.add_argument("--router", default="127.0.0.1:7000")
    ap.add_argument("--max-tokens", type=at_least(1), default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=at_least(0), default=None)
    ap.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY", ""), help="[env PDSERVE_API_KEY]")
    ap.add_argument("--tls-ca", default="", help="CA certificate of a router serving TLS (PEM)")
    ap.add_argument("--tls-server-name", default="", help="the name to check the router's certificate against")
    ap.add_argument(
        "--cluster",
        default="",
        help="a `pdserve up` ready file: its router, CA and API key (instead of the three flags)",
    )


def router_channel(router: str, tls_ca: str = "", server_name: str = "") -> grpc.aio.Channel:
    """A channel to a router: plaintext, or TLS checked against `tls_ca` (no client certificate:
    the public API authenticates with API keys)."""
    if not tls_ca:
        return grpc.aio.insecure_channel(router)
    with open(tls_ca, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(router, credentials, options=options)


def generate(args) -> int:
    router, tls_ca, server_name, api_key = args.router, args.tls_ca, args.tls_server_name, args.api_key
    if args.cluster:
        with open(args.cluster) as f:
            info = json.load(f)
        router, api_key = info["router"], info.get("api_key") or api_key
        if info.get("tls"):
            tls_ca, server_name = info["tls"]["ca"], info["tls"]["server_name"]
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def run():
        async with router_channel(router, tls_ca, server_name) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
            if args.seed is not None:
                sampling.seed = args.seed
            request = router_pb2.GenerateRequest(prompt=args.prompt, sampling=sampling)
            async for response in stub.Generate(request, metadata=metadata):
                print(response.text, end="", flush=True)
                if response.finish_reason:
                    t = response.timing
                    print(
                        f"\n[{response.finish_reason}] {response.usage.completion_tokens} tokens, "
                        f"TTFT {t.ttft_seconds * 1e3:.1f} ms, TPOT {t.tpot_seconds * 1e3:.1f} ms"
                    )

    try:
        asyncio.run(run())
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
