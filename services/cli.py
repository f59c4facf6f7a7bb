"""The `pdserve` command: up (a local cluster), demo, generate (a client), plan (the planner)."""

from __future__ import annotations

import argparse
import asyncio
import sys


def run_command(func, args) -> int:
    """Runs a subcommand; a user's mistake (bad value, missing or malformed file) becomes one line on
    stderr and exit status 2, not a traceback."""
    try:
        return func(args) or 0
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def generate_main(args) -> int:
    """Streams one request through a running router and prints text and timings."""
    import grpc

    from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

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
                    print(f"\n[{response.finish_reason}] {response.usage.completion_tokens} tokens, "
                          f"TTFT {t.ttft_seconds * 1e3:.1f} ms, TPOT {t.tpot_seconds * 1e3:.1f} ms")

    try:
        asyncio.run(run())
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve", description="disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="command", required=True)

    from .launcher import add_up_arguments, up

    up_parser = sub.add_parser("up", help="start a local cluster (router, workers, kvstore daemons)")
    add_up_arguments(up_parser)
    up_parser.set_defaults(func=up)

    from .demo import add_demo_arguments, demo

    demo_parser = sub.add_parser("demo", help="start a local cluster, stream a few requests, stop")
    add_demo_arguments(demo_parser)
    demo_parser.set_defaults(func=demo)

    gen = sub.add_parser("generate", help="stream one request through a router")
    gen.add_argument("prompt")
    gen.add_argument("--router", default="127.0.0.1:7000")
    gen.add_argument("--max-tokens", type=at_least(1), default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=at_least(0), default=None)
    gen.set_defaults(func=generate_main)

    from .planner.cli import add_subparsers as add_plan

    add_plan(sub)  # pdserve plan profile|simulate|search

    args = ap.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
