"""CPU decode of a batch whose contexts differ, as real traffic makes them, against a batch of equal
contexts with the same total, with and without the KV mirror's grouped attention
(services/engine/cpu_kv_mirror.py). All three measured side by side in one run, alternating.

    python -m bench.mixed_batch --batch-sizes 8,16,38 --trials 5

Contexts are prompt + part of the output of requests drawn from the chat workload (as a running
decode batch holds them). Without grouping, attention pads every sequence to the batch's longest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
from tqdm import tqdm

from services.common.trace import make_trace
from services.engine import Engine, EngineConfig, SamplingParams, Sequence, cpu_kv_mirror
from services.engine.testmodels import get_model


def step_seconds(engine: Engine, lengths: list[int], rng: random.Random, steps: int) -> float:
    """Median decode-step time of a batch of these contexts (prefilled untimed, then decoded)."""
    seqs = [Sequence.from_prompt(f"m{rng.random()}", [rng.randrange(3, 1000) for _ in range(n)],
                                 SamplingParams(max_tokens=1 << 20, ignore_eos=True)) for n in lengths]
    for seq in seqs:
        engine.prefill([seq])
    engine.decode_step(seqs)  # joins the mirror
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.decode_step(seqs)
        times.append(time.perf_counter() - start)
    for seq in seqs:
        engine.free(seq)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-serve")
    ap.add_argument("--batch-sizes", default="8,16,38")
    ap.add_argument("--trials", type=int, default=5, help="batches drawn per batch size")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/mixed-batch")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    engine = Engine(get_model(args.model), EngineConfig(dtype="float32", device="cpu", kv_cache_bytes=512 << 20))
    trace = make_trace("chat", 1.0, 2000, seed=0, max_model_len=engine.max_model_len)
    rng = random.Random(0)
    ungrouped = float("inf")  # a ratio no batch reaches: one group, padded to the longest
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        trials = []
        for _ in tqdm(range(args.trials), desc=f"batch {batch}", unit="trial"):
            mixed = [r.prompt_tokens + rng.randint(1, r.output_tokens) for r in rng.sample(trace, batch)]
            equal = [sum(mixed) // batch] * batch
            grouped = step_seconds(engine, mixed, rng, args.steps)
            saved, cpu_kv_mirror.GROUP_LENGTH_RATIO = cpu_kv_mirror.GROUP_LENGTH_RATIO, ungrouped
            try:
                padded = step_seconds(engine, mixed, rng, args.steps)
            finally:
                cpu_kv_mirror.GROUP_LENGTH_RATIO = saved
            trials.append({"mixed_grouped_s": grouped, "mixed_padded_s": padded,
                           "equal_s": step_seconds(engine, equal, rng, args.steps),
                           "mean_context": sum(mixed) / batch, "longest_context": max(mixed)})
        row = {"batch": batch, "trials": trials,
               "grouped_vs_padded": statistics.median(t["mixed_padded_s"] / t["mixed_grouped_s"] for t in trials),
               "grouped_vs_equal": statistics.median(t["mixed_grouped_s"] / t["equal_s"] for t in trials)}
        rows.append(row)
        med = {k: statistics.median(t[k] for t in trials) * 1e3 for k in ("mixed_grouped_s", "mixed_padded_s", "equal_s")}
        print(f"batch {batch:3d}: mixed contexts {med['mixed_grouped_s']:.2f} ms grouped, {med['mixed_padded_s']:.2f} ms "
              f"padded to the longest ({row['grouped_vs_padded']:.2f}x faster grouped); equal contexts of the same "
              f"total {med['equal_s']:.2f} ms (mixed grouped = {row['grouped_vs_equal']:.2f}x that)", flush=True)
    result = {"model": args.model, "threads": args.threads, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
