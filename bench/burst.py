"""Memory after overload bursts (issue 17): a `pdserve up` cluster (tiny Llama on this CPU, 1 prefill
and 1 decode worker on 2 nodes, default admission bounds) gets `--requests` requests at once,
`--bursts` times; each service's private memory (RssAnon) is read after a warm-up and `--settle`
seconds after each burst has drained, when the services have turned idle and handed freed memory back
(services/common/memory.py). Also counted: answers and refusals (RESOURCE_EXHAUSTED). With --heap,
each reading also asks every service for glibc's heap after a collect and malloc_trim (mallinfo2,
bench/heap_probe): bytes in use against free bytes the heap keeps, live memory against fragmentation.

    python -m bench.burst                      # docs/reliability.md's table: 3 bursts of 3,000
    PYTHONMALLOC=malloc python -m bench.burst --bursts 1 --heap    # every Python object on glibc's heap
    python -m bench.burst --bursts 1 --up-arg=--worker-arg=--no-prefix-caching  # flags for `pdserve up`

Results: <out>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
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


async def heap_mib(pids: dict[str, int], folder: str) -> dict[str, dict[str, float]]:
    """Each service's glibc heap after a collect and malloc_trim: total, in use, free (MiB)."""
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)
    await asyncio.sleep(3)
    out = {}
    for name, pid in pids.items():
        with open(os.path.join(folder, f"{pid}.txt")) as f:
            heap, in_use, free = (float(v) for v in f.read().split("\n")[-2].split())
        out[name] = {"heap": heap, "in_use": in_use, "free": free}
    return out


async def bursts(
    cluster: Cluster, requests: int, count: int, settle: float, seed: int, heap_dir: str = ""
) -> list[dict]:
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
        if heap_dir:
            rows[-1]["heap_mib"] = await heap_mib(pids, heap_dir)
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
            if heap_dir:
                rows[-1]["heap_mib"] = await heap_mib(pids, heap_dir)
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="sent at once, per burst")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--settle", type=float, default=15.0, help="seconds after a burst before memory is read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heap", action="store_true", help="also read each service's glibc heap (mallinfo2)")
    ap.add_argument("--up-arg", action="append", default=[], help="extra flag for `pdserve up` (repeatable)")
    ap.add_argument("--out", default="results/burst-memory")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        heap_dir = ""
        if args.heap:  # the services inherit the environment: bench/heap_probe is their sitecustomize
            heap_dir = os.path.join(folder, "heap")
            os.makedirs(heap_dir)
            probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heap_probe")
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (probe, os.environ.get("PYTHONPATH")) if p)
            os.environ["PDSERVE_HEAP_DIR"] = heap_dir
        cluster = Cluster(folder, ("--prefill", "1", "--decode", "1", *args.up_arg))
        try:
            rows = asyncio.run(bursts(cluster, args.requests, args.bursts, args.settle, args.seed, heap_dir))
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
    if args.heap:
        print("\n| glibc heap after malloc_trim, MiB: in use / free | " + " | ".join(r["after"] for r in rows) + " |")
        print("| --- " * (len(rows) + 1) + "|")
        for name in services:
            cells = [f"{r['heap_mib'][name]['in_use']:.1f} / {r['heap_mib'][name]['free']:.1f}" for r in rows]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
