"""What one streamed gRPC message costs a grpc.aio server in Python, with nothing else in the way: the
floor under the router's CPU per token at one token per message (bench.overhead).

    python -m bench.grpc_floor                   # 256 streams of 400 messages, each way below

A server process streams small GenerateResponse messages (the router's, one token each) on
--streams concurrent calls; its CPU time per message is read from /proc. Four ways: the handler
writes with `context.write` (as the router does) or is an async generator, on asyncio's event loop
or uvloop. Measured on this CPU; medians of --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import grpc

from pdserve.v1 import router_pb2, router_pb2_grpc

from .control_plane import cpu_seconds


def serve(port: int, messages: int, style: str, loop: str) -> None:
    class Streamer(router_pb2_grpc.RouterServicer):
        async def Generate(self, request, context):
            response = router_pb2.GenerateResponse(token_ids=[1], text="ab", request_id="x" * 32)
            if style == "write":
                for _ in range(messages):
                    await context.write(response)
                return
            for _ in range(messages):
                yield response

    async def main():
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(Streamer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def _drain(address: str, streams: int) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one() -> int:
            return sum([1 async for _ in stub.Generate(router_pb2.GenerateRequest(prompt="a"))])

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


def measure(style: str, loop: str, args) -> float:
    from services.launcher import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve", str(port), str(args.messages), style, loop],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        asyncio.run(_drain(f"127.0.0.1:{port}", 4))  # warm up
        samples = []
        for _ in range(args.rounds):
            before = cpu_seconds(server.pid)
            received = asyncio.run(_drain(f"127.0.0.1:{port}", args.streams))
            samples.append(1e6 * (cpu_seconds(server.pid) - before) / received)
        return statistics.median(samples)
    finally:
        server.kill()
        server.wait()


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--messages", type=int, default=400, help="per stream")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="results/grpc-floor.json")
    args = ap.parse_args(argv)
    results = {}
    for style in ("write", "generator"):
        for loop in ("asyncio", "uvloop"):
            results[f"{style}/{loop}"] = measure(style, loop, args)
            print(
                f"{style:9s} on {loop:7s}: {results[f'{style}/{loop}']:5.1f} us of server CPU per message", flush=True
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "what": "grpc.aio server CPU per streamed message, measured on this CPU",
                **vars(args),
                "us_per_message": results,
                "at": time.strftime("%Y-%m-%d %H:%M"),
            },
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
