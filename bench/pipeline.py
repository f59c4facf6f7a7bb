"""Pipeline parallelism's decode micro-batches, measured side by side in one run.

    python -m bench.pipeline                      # CPU: ~50M Llama (8 layers), 2 stages, batch 16

Two engines: pp 1 (one process, all the threads) and pp 2 (two rank processes, engine/parallel.py),
the latter run two ways, pass by pass (rank 0 decides each pass's micro-batches, the other rank
follows its inputs):
  - the decode batch whole (--pipeline-micro-batches 1: stage 1 waits while stage 0 computes, and
    the other way round),
  - one micro-batch per stage (the default: stage 0 computes the second half while stage 1
    computes the first).
Decode steps are timed in alternating rounds (machines are noisy: medians and ratios). The ratio
of the two pp 2 rows is the overlap the micro-batches buy; on a CPU the stages share the cores, so
pp 1 is the faster baseline here and the figures say nothing about GPUs. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import replace

import torch
from tqdm import tqdm

from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.sequence import Sequence
from services.tiny_models import get_model

from .mixed_batch import timed_decode_steps

CONFIGS = {  # name -> (engine: pipeline stages, micro-batches of a decode pass)
    "pp1": (1, 0),
    "pp2-whole": (2, 1),
    "pp2-micro": (2, 0),
}


def decode_seconds(engine: Engine, batch: int, prompt_len: int, steps: int, seed: int) -> float:
    """Median seconds per decode step of `batch` sequences (after one prefill)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    seqs = [
        Sequence.from_prompt(
            f"s{seed}-{i}",
            torch.randint(10, vocab, (prompt_len,), generator=g).tolist(),
            SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True),
        )
        for i in range(batch)
    ]
    engine.prefill(seqs)
    return timed_decode_steps(engine, seqs, steps)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-50m", help="test-model spec name or checkpoint folder")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="docs/results/pipeline-cpu.json")
    args = ap.parse_args(argv)
    model_dir = args.model if os.path.isdir(args.model) else get_model(args.model)
    # (one process has at most one process group: one pipelined engine, run both ways)
    engines = {
        pp: Engine(
            model_dir, EngineConfig(dtype="float32", block_size=16, kv_cache_bytes=1 << 30, pipeline_parallel=pp)
        )
        for pp in (1, 2)
    }
    try:
        samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for round_ in tqdm(range(args.rounds), desc="rounds (each configuration once, alternating)"):
            for name, (pp, micro_batches) in CONFIGS.items():
                engine = engines[pp]
                engine.runner.config = replace(engine.runner.config, pipeline_micro_batches=micro_batches)
                samples[name].append(decode_seconds(engine, args.batch, args.prompt_len, args.steps, seed=round_))
    finally:
        for engine in engines.values():
            engine.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "source": f"measured on this CPU ({os.cpu_count()} cores), {args.model}, float32",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "decode_step_seconds": medians,
        "samples": samples,
        "micro_batch_speedup": medians["pp2-whole"] / medians["pp2-micro"],
        "pp2_micro_vs_pp1": medians["pp2-micro"] / medians["pp1"],
    }
    for name, seconds in medians.items():
        print(f"{name:>10}: {seconds * 1e3:8.2f} ms per decode step (median of {args.rounds} rounds)")
    print(f"micro-batches on 2 stages: {result['micro_batch_speedup']:.2f}x faster steps than the whole batch")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    _plot(medians, args.out.replace(".json", ".png"), result["source"])
    return result


def _plot(medians: dict[str, float], path: str, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(medians), [s * 1e3 for s in medians.values()], color=["#888", "#c66", "#6a6"])
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"pipeline decode micro-batches\n{source}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
