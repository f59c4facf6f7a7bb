"""DistServe's headline through pdserve (issue 15's study 1): on the same GPUs, the planner's best
disaggregated placement against the best colocated configurations (prefill first, and chunked
prefill), measured through the real router, workers and kvstore daemons with emulated engines.

    python -m bench.headline                                  # Llama-3-8B, 8 x H100, three workloads
    python -m bench.headline --workloads chat --model llama-3-70b --slo-ttft 0.25 --slo-tpot 0.1 --slow 10

For each workload:
1. `pdserve plan search` (analytic profiles of --model on --gpus x --gpu, one node) chooses the
   disaggregated placement and the colocated baseline's TP degree; plan.json and the profiles it
   simulated each role with go to --out-dir.
2. Three clusters on those GPUs, as `pdserve up --plan` starts them: the plan's prefill and decode
   instances (one emulated worker each), and the colocated baseline's instances (at the TP degree
   the search found best for colocation) with and without --chunked-prefill. Every profile is
   slowed --slow times (LatencyProfile.slowed) with SLOs and rates alike, so a cluster at GPU token
   rates fits on this machine's cores.
3. The same requests on each cluster at rates around that configuration's own predicted goodput
   (--fractions of it, so that every run is spent near its knee; at each rate at least
   --min-duration seconds of arrivals in the profile's time, as the plan search simulates, so that
   the cluster fills: a sequence lives seconds, and a shorter trace ends before the decode batches
   are full), attainment measured at the client. Goodput is the highest rate with at least 90%
   attainment (linear between the grid's rates). Attainment against SLO scale (both SLOs
   multiplied alike, as DistServe's Figure 8) is read from the requests of each configuration's
   rate nearest the disaggregated prediction. Each rate's requests also go through the planner's
   simulator at the same profiles (`simulated`): the search's predictions come from longer
   probes (30 s of arrivals), so the same trace is the like-for-like comparison.
Everything is reported in the profile's own time (rates times --slow). Writes headline.json and
headline.png. It is long: a rate of 400 req/s for 30 s is 12,000 requests, 10 minutes of this
machine's time at --slow 20; the whole study (three workloads, three configurations, three rates)
takes hours.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time

from services.common.latency_profile import LatencyProfile
from services.engine.config import ModelConfig
from services.launcher import Cluster, ClusterSpec
from services.planner import cli as planner_cli
from services.planner.plan_output import read_layout
from services.planner.search import concurrent_sequences
from services.planner.simulator import SimConfig, Slo, simulate
from services.planner.workload import TraceRequest, make_trace
from services.tiny_models import get_model

from .control_plane import scrape
from .emulated_fidelity import MODEL, SLOS
from .loadgen import RequestResult, attainment, percentile, run_trace

CONFIGS = ("disaggregated", "colocated prefill-first", "colocated chunked")
SLO_SCALES = (0.4, 0.6, 0.8, 1.0, 1.2, 1.6, 2.0)
TARGET = 0.9


def slos(args, workload: str) -> tuple[float, float]:
    """(TTFT, TPOT) SLOs in the profile's time: the workload's (set for Llama-3-8B), or --slo-*."""
    ttft, tpot = SLOS[workload]
    return (args.slo_ttft or ttft, args.slo_tpot or tpot)


def search_plan(args, workload: str, out_dir: str) -> dict:
    ttft, tpot = slos(args, workload)
    argv = ["search", "--model", args.model, "--gpu", args.gpu, "--nodes", "1", "--gpus-per-node", str(args.gpus)]
    argv += ["--workload", workload, "--slo-ttft", str(ttft), "--slo-tpot", str(tpot), "--out-dir", out_dir]
    planner_cli.main(argv)
    with open(os.path.join(out_dir, "plan.json")) as f:
        return json.load(f)


def gpus(plan: dict, config: str) -> int:
    """The GPUs a configuration runs on: the plan's, or as many colocated instances as fit in them."""
    if config == "disaggregated":
        return plan["gpus_used"]
    tp = plan["colocated_baseline"]["tensor_parallel"]
    return plan["gpus_used"] // tp * tp


def predicted_goodput(plan: dict, config: str) -> float | None:
    """The simulator's goodput (req/s, the whole cluster) of a configuration; None for a colocated
    policy the search could not run at the baseline's TP degree."""
    if config == "disaggregated":
        return plan["goodput_per_gpu"] * plan["gpus_used"]
    chunked = config == "colocated chunked"
    best = plan["colocated_baseline"]
    candidate = next(
        (
            c
            for c in best["candidates"]
            if c["tensor_parallel"] == best["tensor_parallel"] and c["chunked_prefill"] == chunked
        ),
        None,
    )
    return None if candidate is None else candidate["goodput_per_gpu"] * gpus(plan, config)


def cluster_spec(args, plan_path: str, config: str, log_dir: str) -> ClusterSpec:
    """The cluster `pdserve up --plan` starts for a configuration, every profile slowed."""
    mode = "disaggregated" if config == "disaggregated" else "colocated"
    layout = read_layout(plan_path, mode)
    profiles = {}
    for role, path in layout.profiles.items():
        profiles[role] = os.path.join(log_dir, f"{role}-profile-slowed.json")
        LatencyProfile.load(path).slowed(args.slow).save(profiles[role])
    counts = {role: len(nodes) for role, nodes in layout.nodes.items()}
    chunked = ["--chunked-prefill"] if config == "colocated chunked" else []
    ttft, tpot = (args.slow * v for v in (layout.slo["ttft_s"], layout.slo["tpot_s"]))
    return ClusterSpec(
        model=get_model(MODEL),
        mode=mode,
        prefill=counts.get("prefill", 0),
        decode=counts.get("decode", 0),
        colocated=counts.get("colocated", 0),
        nodes=layout.num_nodes,
        node_of=layout.nodes,
        router_port=0,
        log_dir=log_dir,
        worker_args=["--stream-interval", "8"] + chunked,
        # No in-flight bound at the router: its default (2,048) is about what 8 GPUs' batches hold,
        # and its refusals near the knee would measure that knob, not the configuration.
        router_args=["--slo-ttft-seconds", str(ttft), "--slo-tpot-seconds", str(tpot), "--max-inflight-requests", "0"],
        profiles=profiles,
    )


def goodput(points: list[dict]) -> tuple[float, str]:
    """The highest rate with attainment >= TARGET, linear between the grid's rates; and whether it
    is a bound ('>=' every rate passed, '<' none did) or read between two rates ('=')."""
    if points[0]["attainment"] < TARGET:
        return points[0]["rate"], "<"
    for lo, hi in zip(points, points[1:]):
        if hi["attainment"] < TARGET:
            share = (lo["attainment"] - TARGET) / (lo["attainment"] - hi["attainment"])
            return lo["rate"] + share * (hi["rate"] - lo["rate"]), "="
    return points[-1]["rate"], ">="


def slo_scale_curve(results: list[RequestResult], ttft: float, tpot: float) -> list[dict]:
    return [{"scale": s, "attainment": attainment(results, s * ttft, s * tpot)} for s in SLO_SCALES]


def sim_config(spec: ClusterSpec, config: str) -> SimConfig:
    """The planner's simulator of the cluster `spec` describes, at the same (slowed) profiles."""
    profile = {role: LatencyProfile.load(path) for role, path in spec.profiles.items()}
    if config == "disaggregated":
        return SimConfig(
            prefill_profile=profile["prefill"],
            decode_profile=profile["decode"],
            num_prefill=spec.prefill,
            num_decode=spec.decode,
        )
    return SimConfig(
        mode="colocated",
        colocated_profile=profile["colocated"],
        num_colocated=spec.colocated,
        chunked_prefill=config == "colocated chunked",
    )


def concurrency(spec: ClusterSpec, workload: str) -> int:
    """Requests the cluster's decode side runs at once, counted as `plan search` counts them."""
    trace = make_trace(workload, 1.0, 2000, max_model_len=4096)
    mean_context = sum(r.prompt_tokens + r.output_tokens / 2 for r in trace) / len(trace)
    role, count = ("decode", spec.decode) if spec.mode == "disaggregated" else ("colocated", spec.colocated)
    return count * int(concurrent_sequences(LatencyProfile.load(spec.profiles[role]), mean_context))


def request_trace(args, workload: str, rate: float, min_requests: int = 0) -> list[TraceRequest]:
    """The requests of one rate (profile time), arriving in this machine's (slowed) time: at least
    --min-duration of arrivals and three times what the cluster runs at once, as `plan search`
    probes (a shorter trace ends before the batches fill, and every layout then looks better)."""
    n = max(args.n, math.ceil(rate * args.min_duration), min_requests)
    return make_trace(workload, rate / args.slow, n, seed=args.seed, max_model_len=4096)


def emulation_steps(cluster: Cluster) -> tuple[float, float]:
    """Every emulated worker's steps so far, and those that ran past the profile's time
    (pdserve_emulated_late_steps_total): the machine could not keep up with the cluster."""
    steps = late = 0.0
    for proc in cluster.procs:
        if proc.role in ("prefill", "decode", "colocated"):
            samples = scrape(proc.metrics)
            steps += samples.get("pdserve_emulated_steps_total", 0.0)
            late += samples.get("pdserve_emulated_late_steps_total", 0.0)
    return steps, late


def run_config(args, plan: dict, plan_path: str, workload: str, config: str, rates: list[float]) -> dict:
    log_dir = os.path.join(args.out_dir, workload, "logs", config.replace(" ", "-"))
    os.makedirs(log_dir, exist_ok=True)
    spec = cluster_spec(args, plan_path, config, log_dir)
    ttft, tpot = (args.slow * v for v in slos(args, workload))
    vocab = ModelConfig.from_pretrained(get_model(MODEL)).vocab_size
    cluster = Cluster(spec)
    cluster.start(progress=lambda line: None)
    simulator = sim_config(spec, config)
    min_requests = 3 * concurrency(spec, workload)
    points, by_rate = [], {}
    try:
        router = cluster.info()["router"]
        for k, rate in enumerate(rates):
            started = time.monotonic()
            trace = request_trace(args, workload, rate, min_requests)
            steps_before, late_before = emulation_steps(cluster)
            # each rate its own prompts: the cluster's prefix caches still hold the last rate's
            results = run_trace(router, trace, vocab, seed=args.seed + k, timeout=3600)
            steps, late = (a - b for a, b in zip(emulation_steps(cluster), (steps_before, late_before), strict=True))
            by_rate[rate] = results
            sent_late = [r.sent_late for r in results]
            point = {
                "rate": rate,
                "rate_per_gpu": rate / gpus(plan, config),
                "attainment": attainment(results, ttft, tpot),
                # the same requests through the planner's simulator: the study is a fidelity check too
                "simulated": simulate(simulator, trace, Slo(ttft, tpot)).attainment,
                "ttft_attainment": sum(r.ok and r.ttft <= ttft for r in results) / len(results),
                "tpot_attainment": sum(r.ok and r.tpot <= tpot for r in results) / len(results),
                "errors": sum(not r.ok for r in results),
                "error_kinds": dict(collections.Counter(r.error.split(":")[0] or "none" for r in results if not r.ok)),
                # steps that ended over 1 ms past the profile's time: a large share means this
                # machine was too slow for the cluster at this --slow, and the point is not the profile's
                "late_step_share": late / steps if steps else 0.0,
                # the load generator's lateness, in the profile's time (as the SLOs)
                "sent_late_p50_s": percentile(sent_late, 0.5) / args.slow,
                "sent_late_p99_s": percentile(sent_late, 0.99) / args.slow,
                "seconds": round(time.monotonic() - started, 1),
            }
            points.append(point)
            print(
                f"  {workload:<13} {config:<24} {rate:7.1f} req/s  attainment {point['attainment']:.3f} "
                f"(TTFT {point['ttft_attainment']:.3f}, TPOT {point['tpot_attainment']:.3f}; "
                f"simulated {point['simulated']:.3f}; late steps {100 * point['late_step_share']:.1f}%; "
                f"sent late p99 {1e3 * point['sent_late_p99_s']:.1f} ms)  "
                f"({point['seconds']:.0f} s)",
                flush=True,
            )
    finally:
        cluster.stop()
    value, bound = goodput(points)
    reference = min(rates, key=lambda r: abs(r - plan["goodput_per_gpu"] * plan["gpus_used"]))
    return {
        "config": config,
        "instances": {role: n for role, n in (("prefill", spec.prefill), ("decode", spec.decode)) if n}
        if config == "disaggregated"
        else {"colocated": spec.colocated},
        "predicted_goodput": predicted_goodput(plan, config),
        "goodput": value,
        "goodput_bound": bound,
        "gpus": gpus(plan, config),
        "goodput_per_gpu": value / gpus(plan, config),
        "points": points,
        "slo_scale_rate": reference,
        "slo_scale": slo_scale_curve(by_rate[reference], ttft, tpot),
    }


def run_workload(args, workload: str) -> dict:
    plan_dir = os.path.join(args.out_dir, workload, "plan")
    plan = search_plan(args, workload, plan_dir)
    plan_path = os.path.join(plan_dir, "plan.json")
    runnable = {c: g for c in args.configs if (g := predicted_goodput(plan, c)) is not None}
    configs, predicted = list(runnable), list(runnable.values())
    p, d = plan["prefill"], plan["decode"]
    print(
        f"{workload}: plan {p['replicas']} x prefill (tp={p['tensor_parallel']}, pp={p['pipeline_parallel']}) + "
        f"{d['replicas']} x decode (tp={d['tensor_parallel']}, pp={d['pipeline_parallel']}); colocated tp="
        f"{plan['colocated_baseline']['tensor_parallel']}; predicted goodput "
        + ", ".join(f"{c} {g:.1f}" for c, g in zip(configs, predicted, strict=True))
        + " req/s",
        flush=True,
    )
    runs = [
        run_config(args, plan, plan_path, workload, c, [f * g for f in args.fractions])
        for c, g in zip(configs, predicted, strict=True)
    ]
    if configs[0] != "disaggregated" or len(runs) < 2:  # (a --configs subset: no ratio)
        return {
            "workload": workload,
            "slo": dict(zip(("ttft_s", "tpot_s"), slos(args, workload), strict=True)),
            "gpus_used": plan["gpus_used"],
            "runs": runs,
        }
    best_colocated = max(runs[1:], key=lambda r: r["goodput_per_gpu"])
    return {
        "workload": workload,
        "slo": dict(zip(("ttft_s", "tpot_s"), slos(args, workload), strict=True)),
        "gpus_used": plan["gpus_used"],
        "plan": {
            "prefill": {k: p[k] for k in ("replicas", "tensor_parallel", "pipeline_parallel")},
            "decode": {k: d[k] for k in ("replicas", "tensor_parallel", "pipeline_parallel")},
            "colocated_tensor_parallel": plan["colocated_baseline"]["tensor_parallel"],
        },
        "runs": runs,
        "ratio_to_best_colocated": runs[0]["goodput_per_gpu"] / best_colocated["goodput_per_gpu"],
        # '=' when both goodputs were read between the grid's rates; else the ratio is a bound
        "ratio_bound": "=" if runs[0]["goodput_bound"] == best_colocated["goodput_bound"] == "=" else "~",
        "predicted_ratio": predicted[0]
        / gpus(plan, "disaggregated")
        / max(g / gpus(plan, c) for c, g in zip(configs[1:], predicted[1:], strict=True)),
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7.5), squeeze=False)
    for col, w in enumerate(workloads):
        top, bottom = axes[0][col], axes[1][col]
        for run in w["runs"]:
            (line,) = top.plot(
                [p["rate_per_gpu"] for p in run["points"]],
                [p["attainment"] for p in run["points"]],
                "o-",
                label=run["config"],
            )
            top.plot(
                [p["rate_per_gpu"] for p in run["points"]],
                [p["simulated"] for p in run["points"]],
                "x--",
                color=line.get_color(),
                alpha=0.6,
                label=f"{run['config']}, simulated",
            )
            bottom.plot(
                [s["scale"] for s in run["slo_scale"]],
                [s["attainment"] for s in run["slo_scale"]],
                "o-",
                label=f"{run['config']} at {run['slo_scale_rate'] / run['gpus']:.1f} req/s per GPU",
            )
        for ax in (top, bottom):
            ax.axhline(TARGET, color="grey", lw=0.8, ls=":")
            ax.set_ylabel("SLO attainment")
            ax.legend(fontsize=7)
        slo = w["slo"]
        top.set_title(
            f"{w['workload']} (TTFT {slo['ttft_s']} s, TPOT {slo['tpot_s']} s), {w['gpus_used']} GPUs", fontsize=9
        )
        top.set_xlabel("requests/s per GPU")
        bottom.set_xlabel("SLO scale (both SLOs multiplied)")
    fig.suptitle(
        f"{result['model']}, emulated at {result['gpu']} timings (analytic profiles)\nmeasured on this CPU", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b", help="a planner model preset")
    ap.add_argument("--gpu", default="H100-80G")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the one node")
    ap.add_argument("--workloads", default="chat,code,summarization")
    ap.add_argument("--slow", type=float, default=20.0, help="run every profile this many times slower")
    ap.add_argument(
        "--fractions",
        type=lambda text: sorted(float(f) for f in text.split(",")),
        default=[0.85, 1.0, 1.15],
        help="rates to run, as shares of each configuration's predicted goodput",
    )
    ap.add_argument(
        "--configs",
        type=lambda text: [c.strip() for c in text.split(",")],
        default=list(CONFIGS),
        help=f"configurations to run, of {', '.join(CONFIGS)} (the ratio needs the first and another)",
    )
    ap.add_argument("--n", type=int, default=300, help="requests per rate, at least")
    ap.add_argument(
        "--min-duration", type=float, default=30.0, help="seconds of arrivals per rate in the profile's time, at least"
    )
    ap.add_argument("--slo-ttft", type=float, help="seconds (default: the workload's, set for an 8B model)")
    ap.add_argument("--slo-tpot", type=float, help="seconds (default: the workload's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="results/headline")
    args = ap.parse_args(argv)
    for workload in args.workloads.split(","):
        if workload not in SLOS:
            ap.error(f"--workloads: {workload!r} is not one of {', '.join(SLOS)}")
    if len(args.fractions) < 2 or min(args.fractions) <= 0:
        ap.error("--fractions: at least two positive shares")
    if not args.configs or any(c not in CONFIGS for c in args.configs):
        ap.error(f"--configs: some of {', '.join(CONFIGS)}")
    args.configs = [c for c in CONFIGS if c in args.configs]
    os.makedirs(args.out_dir, exist_ok=True)
    workloads = [run_workload(args, w) for w in args.workloads.split(",")]
    result = {
        "model": args.model,
        "gpu": args.gpu,
        "slowed": args.slow,
        "min_duration_s": args.min_duration,
        "n": args.n,
        "workloads": workloads,
    }
    with open(os.path.join(args.out_dir, "headline.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out_dir, "headline.png"))
    for w in workloads:
        if "ratio_to_best_colocated" not in w:
            continue
        cells = ", ".join(f"{r['config']} {r['goodput_bound']}{r['goodput_per_gpu']:.2f}" for r in w["runs"])
        print(
            f"{w['workload']}: goodput per GPU {cells}; disaggregated / best colocated "
            f"{w['ratio_bound'].replace('=', '')}{w['ratio_to_best_colocated']:.2f}x "
            f"(simulated {w['predicted_ratio']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
