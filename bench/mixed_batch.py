"""CPU decode of a batch whose contexts differ, as real traffic makes them, against a batch of equal
contexts with the same total, through both CPU backends, side by side in one run, alternating:
- pdserve's CPU kernels (services/engine/kernels/cpu.py): each sequence attends over exactly its
  own context, so a step should cost about what the equal batch costs;
- the torch backend, with the KV mirror's grouped attention (services/engine/backends/kv_mirror.py) and
  without it (every sequence padded to the batch's longest).

    python -m bench.mixed_batch --batch-sizes 8,16,38 --trials 5

Contexts are prompt + part of the output of requests drawn from the chat workload (as a running
decode batch holds them).
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

from services.engine.backends import kv_mirror
from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.sequence import Sequence
from services.planner.workload import make_trace
from services.tiny_models import get_model


def step_seconds(engine: Engine, lengths: list[int], rng: random.Random, steps: int) -> float:
    """Median decode-step time of a batch of these contexts (prefilled untimed, then decoded)."""
    seqs = [
        Sequence.from_prompt(
            f"m{rng.random()}",
            [rng.randrange(3, 1000) for _ in range(n)],
            SamplingParams(max_tokens=1 << 20, ignore_eos=True),
        )
        for n in lengths
    ]
    for seq in seqs:
        engine.prefill([seq])
    engine.decode_step(seqs)  # joins the mirror
    return timed_decode_steps(engine, seqs, steps)


def timed_decode_steps(engine: Engine, seqs: list[Sequence], steps: int) -> float:
    """Median seconds of `steps` decode steps of these (prefilled) sequences, which are then freed."""
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
    kernels, torch_path = (
        Engine(
            get_model(args.model),
            EngineConfig(dtype="float32", device="cpu", kv_cache_bytes=512 << 20, backend=backend),
        )
        for backend in ("auto", "torch")
    )
    if kernels.backend.name != "cpu-kernels":
        print("note: the CPU kernels are unavailable here (see the log); both columns run the torch backend")
    trace = make_trace("chat", 1.0, 2000, seed=0, max_model_len=kernels.max_model_len)
    rng = random.Random(0)
    ungrouped = float("inf")  # a ratio no batch reaches: one group, padded to the longest
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        trials = []
        for _ in tqdm(range(args.trials), desc=f"batch {batch}", unit="trial"):
            mixed = [r.prompt_tokens + rng.randint(1, r.output_tokens) for r in rng.sample(trace, batch)]
            equal = [sum(mixed) // batch] * batch
            trial = {
                "kernels_mixed_s": step_seconds(kernels, mixed, rng, args.steps),
                "kernels_equal_s": step_seconds(kernels, equal, rng, args.steps),
                "torch_grouped_s": step_seconds(torch_path, mixed, rng, args.steps),
            }
            saved, kv_mirror.GROUP_LENGTH_RATIO = kv_mirror.GROUP_LENGTH_RATIO, ungrouped
            try:
                trial["torch_padded_s"] = step_seconds(torch_path, mixed, rng, args.steps)
            finally:
                kv_mirror.GROUP_LENGTH_RATIO = saved
            trials.append(dict(trial, mean_context=sum(mixed) / batch, longest_context=max(mixed)))
        row = {
            "batch": batch,
            "trials": trials,
            "kernels_mixed_vs_equal": statistics.median(t["kernels_mixed_s"] / t["kernels_equal_s"] for t in trials),
            "kernels_vs_torch_grouped": statistics.median(t["torch_grouped_s"] / t["kernels_mixed_s"] for t in trials),
            "torch_grouped_vs_padded": statistics.median(t["torch_padded_s"] / t["torch_grouped_s"] for t in trials),
        }
        rows.append(row)
        med = {
            k: statistics.median(t[k] for t in trials) * 1e3
            for k in ("kernels_mixed_s", "kernels_equal_s", "torch_grouped_s", "torch_padded_s")
        }
        print(
            f"batch {batch:3d}: CPU kernels {med['kernels_mixed_s']:.2f} ms mixed, {med['kernels_equal_s']:.2f} ms "
            f"equal contexts of the same total ({row['kernels_mixed_vs_equal']:.2f}x); torch path "
            f"{med['torch_grouped_s']:.2f} ms grouped ({row['kernels_vs_torch_grouped']:.2f}x the kernels' time), "
            f"{med['torch_padded_s']:.2f} ms padded to the longest ({row['torch_grouped_vs_padded']:.2f}x grouped)",
            flush=True,
        )
    result = {"model": args.model, "threads": args.threads, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
