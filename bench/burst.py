"""Memory after overload bursts (issue 17): a `pdserve up` cluster (tiny Llama on this CPU, 1 prefill
and 1 decode worker on 2 nodes, default admission bounds) gets `--requests` requests at once,
`--bursts` times; each service's private memory (RssAnon) is read after a warm-up and `--settle`
seconds after each burst has drained, when the services have turned idle and handed freed memory back
(services/common/memory.py). Also counted: answers and refusals (RESOURCE_EXHAUSTED).

    python -m bench.burst                      # docs/reliability.md's table: 3 bursts of 3,000

Results: <out>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import tempfile
import time

import grpc

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.tiny_models import CORPUS_WORDS

from .soak import Cluster, rss_anon_mib


async def _one(stub, rng: random.Random) -> str:
    prompt = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(5, 80)))
    request = router_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0))
    try:
        async for _ in stub.Generate(request, timeout=300):
            pass
        return "answered"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def bursts(cluster: Cluster, requests: int, count: int, settle: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    info = cluster.info()
    pids = {s["name"]: s["pid"] for s in info["services"]}
    rows: list[dict] = []
    async with grpc.aio.insecure_channel(info["router"]) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for _ in range(4):  # warm-up: every path taken, then idle long enough to be trimmed
            await asyncio.gather(*(_one(stub, rng) for _ in range(50)))
        await asyncio.sleep(settle)
        rows.append({"after": "warm-up", "rss_mib": {n: rss_anon_mib(p) for n, p in pids.items()}})
        print(rows[-1], flush=True)
        for b in range(count):
            start = time.perf_counter()
            outcomes = collections.Counter(await asyncio.gather(*(_one(stub, rng) for _ in range(requests))))
            seconds = time.perf_counter() - start
            await asyncio.sleep(settle)
            rows.append(
                {
                    "after": f"burst {b + 1}",
                    "seconds": round(seconds, 1),
                    "outcomes": dict(outcomes),
                    "rss_mib": {n: rss_anon_mib(p) for n, p in pids.items()},
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="sent at once, per burst")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--settle", type=float, default=15.0, help="seconds after a burst before memory is read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/burst-memory")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        cluster = Cluster(folder, ("--prefill", "1", "--decode", "1"))
        try:
            rows = asyncio.run(bursts(cluster, args.requests, args.bursts, args.settle, args.seed))
        finally:
            cluster.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    services = list(rows[0]["rss_mib"])
    print("| RssAnon, MiB | " + " | ".join(r["after"] for r in rows) + " |")
    print("| --- " * (len(rows) + 1) + "|")
    for name in services:
        base = rows[0]["rss_mib"][name]
        cells = [f"{base:.0f}"] + [f"{r['rss_mib'][name]:.0f} ({r['rss_mib'][name] / base - 1:+.0%})" for r in rows[1:]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
