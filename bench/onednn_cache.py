"""oneDNN's per-shape caches against speed and memory (docs/reliability.md): a tiny Llama engine on
this CPU prefills batches of 1-8 prompts of random lengths (5-120 tokens; every batch a new shape,
as serving sees them), then runs 8 decode steps per batch, with both caches (oneDNN's primitive
cache and ideep's, `ONEDNN_PRIMITIVE_CACHE_CAPACITY` / `LRU_CACHE_CAPACITY`) at each capacity, in
fresh processes, the capacities alternating over `--rounds`. Prints medians of ms per batch and the
process's private memory at the end.

    python -m bench.onednn_cache                 # 1024 (oneDNN's default) against 64 (pdserve's)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRIAL = """
import json, random, time
import torch
from services.common.memory import resident_anonymous_bytes
from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.sequence import Sequence
from services.tiny_models import get_model

torch.set_num_threads(1)
engine = Engine(get_model("llama"), EngineConfig(dtype="float32", device="cpu", block_size=16, kv_cache_bytes=64 << 20))
rng = random.Random(0)

def batches(n, decode_steps):
    start = time.perf_counter()
    for i in range(n):
        seqs = [Sequence.from_prompt(f"{n}-{i}-{j}", [rng.randint(3, 900) for _ in range(rng.randint(5, 120))],
                                     SamplingParams(max_tokens=decode_steps + 1, temperature=0, ignore_eos=True))
                for j in range(rng.randint(1, 8))]
        engine.prefill(seqs)
        for _ in range(decode_steps):
            engine.decode_step(seqs)
        for seq in seqs:
            engine.free(seq)
    return (time.perf_counter() - start) / n * 1e3

batches(200, 0)
prefill_ms = batches(300, 0)
decode_ms = batches(100, 8)
rss_mib = resident_anonymous_bytes() / 2**20
print(json.dumps({"prefill_ms": prefill_ms, "with_decode_ms": decode_ms, "rss_mib": rss_mib}))
"""


def trial(capacity: int) -> dict:
    env = dict(os.environ, ONEDNN_PRIMITIVE_CACHE_CAPACITY=str(capacity), LRU_CACHE_CAPACITY=str(capacity))
    out = subprocess.run([sys.executable, "-c", TRIAL], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacities", default="1024,64")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    capacities = [int(c) for c in args.capacities.split(",")]
    results: dict[int, list[dict]] = {c: [] for c in capacities}
    for r in range(args.rounds):
        for capacity in capacities:
            results[capacity].append(trial(capacity))
            print(f"round {r + 1}, capacity {capacity}: {results[capacity][-1]}", flush=True)
    print("| capacity | prefill ms/batch | prefill + 8 decode steps ms/batch | RssAnon MiB |")
    print("| --- | --- | --- | --- |")
    for capacity, runs in results.items():
        cells = [statistics.median(r[k] for r in runs) for k in ("prefill_ms", "with_decode_ms", "rss_mib")]
        print(f"| {capacity} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
