"""What opening a kvstore UCX connection costs, against a round trip on an open one: why pulling
daemons pool their connections (docs/kvstore.md).

    python -m bench.ucx_connect                  # 40 connections, each opened, used once, closed

A child process accepts connections as a kvstore daemon does (ucx_endpoints.Acceptor) and echoes
control frames; this process opens them (ConnectionPool: an endpoint to the child's worker address,
the hello, the child's endpoint back and its answer), sends one frame and waits for the echo, and
closes. Loopback, UCX_TLS=tcp,self (the transport between two nodes); measured on this CPU.
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

ENV = {"UCX_TLS": "tcp,self"}


def echo_forever() -> None:
    from services.common.server import run_event_loop
    from services.kvstore.ucx_endpoints import Acceptor, recv_frame, send_frame
    from services.kvstore.ucx_environment import configure_ucx_environment

    configure_ucx_environment("", "127.0.0.1")

    async def serve(connection) -> None:
        while not connection.closed:
            await send_frame(connection, await recv_frame(connection))

    async def main() -> None:
        from services.kvstore.ucx_endpoints import this_worker_address

        acceptor = Acceptor(serve)
        acceptor.start()
        print(this_worker_address(), flush=True)
        await asyncio.Event().wait()

    run_event_loop(main())


async def measure(address: str, connections: int) -> dict:
    from services.kvstore.ucx_endpoints import ConnectionPool, recv_frame, send_frame

    pool = ConnectionPool(connect_timeout=10.0)
    opens, round_trips = [], []
    for _ in range(connections):
        started = time.perf_counter()
        connection, _ = await pool.acquire(address)
        opened = time.perf_counter()
        await send_frame(connection, {"op": "ping"})
        assert (await recv_frame(connection)) == {"op": "ping"}
        round_trips.append(time.perf_counter() - opened)
        opens.append(opened - started)
        await pool.discard(connection)
    return {
        "first_open_ms": opens[0] * 1e3,
        "open_ms_median": statistics.median(opens[1:]) * 1e3,
        "open_ms_p90": statistics.quantiles(opens[1:], n=10)[-1] * 1e3,
        "round_trip_ms_median": statistics.median(round_trips) * 1e3,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=40)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.update(ENV)
    if args.serve:
        echo_forever()
        return
    from services.kvstore.ucx_environment import configure_ucx_environment

    configure_ucx_environment("", "127.0.0.1")
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.ucx_connect", "--serve"], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert child.stdout is not None
        address = child.stdout.readline().strip()
        result = asyncio.run(measure(address, args.connections))
    finally:
        child.kill()
        child.wait()
    print(json.dumps({"connections": args.connections, **{k: round(v, 2) for k, v in result.items()}}, indent=1))


if __name__ == "__main__":
    main()
