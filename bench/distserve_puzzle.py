"""Issue 15's puzzle: why `plan search` predicts far smaller disaggregation gains than DistServe
reports for the same models, GPUs and SLOs. Simulated (the planner's simulator, which the emulated
cluster measured within 4 points: docs/planner.md "On emulated timing"), at analytic A100-80G
timings, 4 nodes x 8 GPUs, as in DistServe's evaluation.

    python -m bench.distserve_puzzle                # OPT-13B and OPT-66B chat, prompts x1, x2, x4
    python -m bench.distserve_puzzle --models opt-13b --prompt-factors 1,3

Three differences between the planner's comparison and DistServe's, added one at a time:
- the colocated baseline's tensor parallelism: the planner takes the best per GPU, DistServe ran
  vLLM at a fixed degree per model (TP-1 for OPT-13B, TP-4 for OPT-66B; its artifact's
  2-start-api-server.py);
- vLLM's prefill budget: DistServe started vLLM with --max-num-batched-tokens 16384 and
  --max-num-seqs 1024 (same file), so one prefill-first step may hold 16k prompt tokens and stall
  every running decode for all of it; the planner's colocated instance uses the profile's L_m;
- prompt lengths: DistServe's ShareGPT prompts join a random number of a conversation's earlier
  turns (its 0-prepare-dataset.py: conversations of at least 3 turns, prompt + output < 2048),
  while the planner's "chat" workload is one turn (the vLLM paper's means, 161 prompt / 338
  output tokens). Without the dataset here, prompts are scaled by --prompt-factors (capped so that
  prompt + output < 2048, as DistServe prunes).
Each row: disaggregated goodput per GPU (the planner's placement search, Algorithm 1) against the
colocated baseline of that row, both at 90% attainment of both SLOs. Writes puzzle.json and
puzzle.png.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from tqdm import tqdm

from services.planner.analytic import AnalyticAssumptions
from services.planner.hardware import ClusterSpec, GiB, get_gpu, get_model_shape
from services.planner.search import PlacementSearch, SearchSpec
from services.planner.simulator import Slo

# DistServe's chatbot SLOs (TTFT, TPOT) and the TP degree its artifact ran vLLM at, per model
CASES = {"opt-13b": (Slo(0.25, 0.1), 1), "opt-66b": (Slo(2.5, 0.15), 4)}
VLLM_MAX_BATCHED_TOKENS = 16384
VLLM_MAX_NUM_SEQS = 1024
CONTEXT = 2048  # OPT's window; DistServe drops longer requests


class PromptScaledSearch(PlacementSearch):
    """The planner's search on its chat workload with every prompt `factor` times longer."""

    def __init__(self, spec: SearchSpec, factor: float):
        self.factor = factor  # before super().__init__, which draws the first trace
        super().__init__(spec, progress=False)

    def base_trace(self, n: int, rate: float = 1.0, seed_offset: int = 0):
        trace = super().base_trace(n, rate, seed_offset)
        return [
            replace(r, prompt_tokens=max(1, min(round(r.prompt_tokens * self.factor), CONTEXT - 1 - r.output_tokens)))
            for r in trace
        ]

    def vllm_colocated_goodput(self, tp: int, vllm_budgets: bool) -> float:
        """Goodput of one prefill-first colocated instance at `tp`, optionally with vLLM's budgets."""
        prof = self.profile(tp, 1)
        if vllm_budgets:
            prof = replace(prof, max_batched_tokens=VLLM_MAX_BATCHED_TOKENS, max_num_seqs=VLLM_MAX_NUM_SEQS)
        return self.colocated_goodput_of(prof, chunked_prefill=False)


def study(model: str, factor: float, args) -> dict:
    slo, vllm_tp = CASES[model]
    spec = SearchSpec(
        model=get_model_shape(model, 2),
        cluster=ClusterSpec(args.nodes, args.gpus_per_node, get_gpu("A100-80G"), None, 0.9, 4 * GiB),
        slo=slo,
        workload="chat",
        assumptions=AnalyticAssumptions(),
        workers=1,  # the trace override lives in this process
    )
    search = PromptScaledSearch(spec, factor)
    plan = search.run()
    assert plan.colocated_baseline is not None
    best = plan.colocated_baseline
    prefill_first = max((c for c in best["candidates"] if not c["chunked_prefill"]), key=lambda c: c["goodput_per_gpu"])
    search = PromptScaledSearch(spec, factor)  # run() closed the first one
    at_vllm_tp = search.vllm_colocated_goodput(vllm_tp, False) / vllm_tp
    as_distserve_ran = search.vllm_colocated_goodput(vllm_tp, True) / vllm_tp
    p, d = plan.prefill, plan.decode
    trace = search.trace
    return {
        "model": model,
        "prompt_factor": factor,
        "mean_prompt": search.mean_prompt,
        "mean_output": sum(r.output_tokens for r in trace) / len(trace),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "disaggregated": {
            "goodput_per_gpu": plan.rate / plan.gpus_used,
            "placement": f"P tp{p.tensor_parallel} pp{p.pipeline_parallel} x{plan.num_prefill}, "
            f"D tp{d.tensor_parallel} pp{d.pipeline_parallel} x{plan.num_decode}",
        },
        "colocated": {
            "best (planner)": {
                "goodput_per_gpu": best["goodput_per_gpu"],
                "tp": best["tensor_parallel"],
                "chunked_prefill": best["chunked_prefill"],
            },
            "best prefill-first": {
                "goodput_per_gpu": prefill_first["goodput_per_gpu"],
                "tp": prefill_first["tensor_parallel"],
            },
            f"prefill-first at vLLM's TP-{vllm_tp}": {"goodput_per_gpu": at_vllm_tp, "tp": vllm_tp},
            f"vLLM as DistServe ran it (TP-{vllm_tp}, {VLLM_MAX_BATCHED_TOKENS}-token steps)": {
                "goodput_per_gpu": as_distserve_ran,
                "tp": vllm_tp,
            },
        },
    }


CLIP = 4.0  # plotted ratios stop here


def ratio(row: dict, baseline: str) -> float:
    colocated = row["colocated"][baseline]["goodput_per_gpu"]
    return row["disaggregated"]["goodput_per_gpu"] / colocated if colocated > 0 else float("inf")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        baselines = list(mine[0]["colocated"])
        width = 0.8 / len(baselines)
        for i, name in enumerate(baselines):
            xs = [j + i * width for j in range(len(mine))]
            ratios = [ratio(r, name) for r in mine]
            bars = ax.bar(xs, [min(x, CLIP) for x in ratios], width, label=f"against {name}")
            for bar, x in zip(bars, ratios):
                if x > CLIP:  # the colocated baseline met the SLOs at no rate
                    ax.annotate("inf", (bar.get_x() + width / 2, CLIP), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylim(0, CLIP * 1.1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mine))])
        ax.set_xticklabels([f"prompts x{r['prompt_factor']:g}\n(mean {r['mean_prompt']:.0f})" for r in mine])
        ax.set_ylabel("disaggregated / colocated goodput per GPU")
        slo = mine[0]["slo"]
        ax.set_title(f"{model} chat (TTFT {slo['ttft_s']} s, TPOT {slo['tpot_s']} s)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Simulated at analytic A100-80G timings, 4 x 8 GPUs (the planner's simulator)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--prompt-factors", default="1,2,4")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--out-dir", default="results/distserve-puzzle")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    for m in models:
        if m not in CASES:
            ap.error(f"--models: {m!r} is not one of {', '.join(CASES)}")
    factors = [float(f) for f in args.prompt_factors.split(",")]
    if any(f <= 0 for f in factors):
        ap.error("--prompt-factors: positive numbers")
    os.makedirs(args.out_dir, exist_ok=True)
    cases = [(m, f) for m in models for f in factors]
    rows = [study(m, f, args) for m, f in tqdm(cases, desc="puzzle", unit="case")]
    with open(os.path.join(args.out_dir, "puzzle.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(args.out_dir, "puzzle.png"))
    for r in rows:
        disagg = r["disaggregated"]["goodput_per_gpu"]
        print(
            f"{r['model']} prompts x{r['prompt_factor']:g} (mean {r['mean_prompt']:.0f}/{r['mean_output']:.0f}): "
            f"disaggregated {disagg:.2f} req/s/GPU ({r['disaggregated']['placement']})"
        )
        for name, c in r["colocated"].items():
            print(f"    {name:<58} {c['goodput_per_gpu']:6.2f}  ratio {ratio(r, name):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
