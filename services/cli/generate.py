"""`pdserve generate`: stream one request through a running router and print text and timings."""

from __future__ import annotations

import argparse
import asyncio
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


def generate(args) -> int:
    async def run():
        async with grpc.aio.insecure_channel(args.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
            if args.seed is not None:
                sampling.seed = args.seed
            async for response in stub.Generate(router_pb2.GenerateRequest(prompt=args.prompt, sampling=sampling)):
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
