"""SLO attainment against request rate, disaggregated against colocated, on the same cores.

    python -m bench.serving --workload chat --scale 0.25 --rates 1,2,3,4,6 --n 40

For each configuration, in one invocation on one machine:
  colocated      one worker doing both phases, pinned to all --cores cores (torch threads = cores)
  disaggregated  one prefill worker on the first half of the cores, one decode worker on the other
                 half, a kvstore daemon between them (same node: local copies)
The router, the kvstore daemon and this load generator are not pinned; both configurations have
the router and the load generator, the disaggregated one also its daemon.

SLOs: given with --ttft-slo/--tpot-slo, or scaled to the model's speed: the median TTFT and TPOT
of requests sent one at a time to the colocated configuration, times --ttft-scale and --tpot-scale
(DistServe's chatbot SLOs are ~5x and ~4x the unloaded latencies of its 13B model).

Each rate replays the same requests (one seeded trace, arrivals compressed to the rate), so the
configurations and rates differ only in timing. Goodput: the highest rate with attainment >=
--target, found by bisection between swept rates. Writes JSON and PNGs (attainment against rate
for both configurations on one chart; TTFT and TPOT CDFs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict

from tqdm import tqdm

from services.engine.config import ModelConfig
from services.launcher import Cluster, ClusterSpec
from services.planner.goodput import bisect_rate
from services.planner.workload import make_trace, rescale_rate
from services.tiny_models import get_model

from .loadgen import RequestResult, attainment, run_trace, summarize


def cluster_spec(
    config: str, model: str, cores: int, log_dir: str, kv_cache_gb: float, pin_serving_to_prefill: bool = False
) -> ClusterSpec:
    """Colocated: one worker on all cores. Disaggregated: prefill on the first half, decode on the
    second. The router and kvstore float over all cores, unless `pin_serving_to_prefill` puts them
    on the prefill cores (then nothing but the decode worker runs on the decode cores)."""
    all_cores = f"0-{cores - 1}"
    if config == "colocated":
        return ClusterSpec(
            model=model,
            mode="colocated",
            colocated=1,
            threads=cores,
            kv_cache_gb=kv_cache_gb,
            log_dir=log_dir,
            router_port=0,
            role_args={"colocated": ["--cpu-affinity", all_cores]},
        )
    half = max(1, cores // 2)
    prefill_cores = f"0-{half - 1}" if half > 1 else "0"
    decode_cores = f"{half}-{cores - 1}" if cores - half > 1 else str(min(half, cores - 1))
    serving = ["--cpu-affinity", prefill_cores] if pin_serving_to_prefill else []
    return ClusterSpec(
        model=model,
        mode="disaggregated",
        prefill=1,
        decode=1,
        nodes=1,
        threads=max(1, cores // 2),
        kv_cache_gb=kv_cache_gb,
        log_dir=log_dir,
        router_port=0,
        role_args={"prefill": ["--cpu-affinity", prefill_cores], "decode": ["--cpu-affinity", decode_cores]},
        router_args=serving,
        kvstore_args=list(serving),
    )


class ConfigRunner:
    """One configuration's cluster, with every probe's results cached by rate."""

    def __init__(self, name: str, spec: ClusterSpec, base_trace, vocab: int, seed: int):
        self.name = name
        self.spec = spec
        self.base_trace = base_trace
        self.vocab = vocab
        self.seed = seed
        self.cluster: Cluster | None = None
        self.runs: dict[float, list[RequestResult]] = {}

    def __enter__(self):
        self.cluster = Cluster(self.spec)
        self.cluster.start(progress=lambda line: None)
        self.router = self.cluster.info()["router"]
        run_trace(self.router, rescale_rate(self.base_trace[:4], 100.0, 1.0), self.vocab, seed=99, progress=False)
        return self

    def __exit__(self, *exc):
        assert self.cluster is not None
        self.cluster.stop()

    def run(self, rate: float) -> list[RequestResult]:
        rate = round(rate, 4)
        if rate not in self.runs:
            trace = rescale_rate(self.base_trace, rate, from_rate=1.0)
            # each probe its own prompts: the cluster's prefix caches hold the earlier probes'
            seed = self.seed + 1000 * (len(self.runs) + 1)
            self.runs[rate] = run_trace(self.router, trace, self.vocab, seed=seed, progress=False)
        return self.runs[rate]

    def unloaded(self, n: int = 8) -> tuple[float, float, float]:
        """Median TTFT, TPOT and end-to-end latency of requests sent one at a time."""
        results = []
        for i, request in enumerate(self.base_trace[:n]):
            one = [type(request)(0.0, request.prompt_tokens, request.output_tokens, request.prompt, f"solo-{i}")]
            results += run_trace(self.router, one, self.vocab, seed=self.seed + i, progress=False)
        ok = [r for r in results if r.ok]
        return (
            statistics.median(r.ttft for r in ok),
            statistics.median(r.tpot for r in ok if r.tokens > 1),
            statistics.median(r.e2e for r in ok),
        )


def steady_state_limit(n: int, unloaded_e2e: float, windows: float = 4.0) -> float:
    """The highest rate a trace of n requests can probe: its arrivals must span several request
    lifetimes, or the run measures how a burst drains rather than the rate it claims."""
    return n / (windows * unloaded_e2e)


def goodput(
    runner: ConfigRunner,
    swept: list[float],
    ttft_slo: float,
    tpot_slo: float,
    target: float,
    rel_tol: float,
    max_rate: float = math.inf,
) -> tuple[float, bool]:
    """(goodput, capped): capped when every rate the trace can probe met the target, so the true
    goodput is at least the number returned."""

    def att(rate: float) -> float:
        return attainment(runner.run(rate), ttft_slo, tpot_slo)

    swept = [r for r in swept if r <= max_rate] or [max_rate]
    passing = [r for r in swept if att(r) >= target]
    if not passing:
        return (bisect_rate(att, target, 0.0, min(swept), rel_tol) if att(min(swept) / 4) >= target else 0.0), False
    lo = max(passing)
    failing = [r for r in swept if r > lo and att(r) < target]
    hi = min(failing) if failing else lo * 2
    while not failing:
        if hi > max_rate:
            return (lo, True) if att(max_rate) < target else (max_rate, True)
        if att(hi) < target:
            break
        lo, hi = hi, hi * 2
    return bisect_rate(att, target, lo, hi, rel_tol), False


def plot(result: dict, path_prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, cfg in result["configs"].items():
        points = sorted((float(rate), run["summary"]["attainment"]) for rate, run in cfg["runs"].items())
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], "o-", label=f"{name} (goodput {cfg['goodput']:.2f} req/s)"
        )
        ax.axvline(cfg["goodput"], linestyle=":", color=ax.lines[-1].get_color())
    ax.axhline(result["target"], color="gray", linestyle="--", label=f"target {result['target']:.0%}")
    ax.set(
        xlabel="request rate (req/s)",
        ylabel="SLO attainment (TTFT and TPOT)",
        ylim=(-0.02, 1.02),
        title=f"{result['workload']}: TTFT SLO {result['slo']['ttft'] * 1e3:.0f} ms, "
        f"TPOT SLO {result['slo']['tpot'] * 1e3:.1f} ms",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(f"{path_prefix}-attainment.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rate = result["cdf_rate"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, cfg in result["configs"].items():
        run = cfg["runs"].get(str(rate))
        if not run:
            continue
        for ax, key, slo in ((axes[0], "ttft", result["slo"]["ttft"]), (axes[1], "tpot", result["slo"]["tpot"])):
            values = sorted(
                r[key] for r in run["requests"] if not r["error"] and r["tokens"] > (1 if key == "tpot" else 0)
            )
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
            ax.axvline(slo, color="gray", linestyle="--")
    axes[0].set(xlabel="TTFT (s)", ylabel="fraction of requests", title=f"TTFT CDF at {rate} req/s", xscale="log")
    axes[1].set(xlabel="TPOT (s)", title=f"TPOT CDF at {rate} req/s", xscale="log")
    axes[0].legend()
    fig.tight_layout()
    paths.append(f"{path_prefix}-cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-serve", help="test-model spec name or checkpoint folder")
    ap.add_argument("--workload", default="chat", help="chat, code or summarization")
    ap.add_argument("--scale", type=float, default=0.25, help="multiply the workload's lengths (tiny models)")
    ap.add_argument("--n", type=int, default=40, help="requests per rate")
    ap.add_argument("--rates", default="1,2,4,6", help="request rates to sweep (req/s)")
    ap.add_argument("--configs", default="colocated,disaggregated")
    ap.add_argument("--cores", type=int, default=min(2, os.cpu_count() or 1), help="cores both configurations share")
    ap.add_argument("--ttft-slo", type=float, default=0.0, help="seconds (0: scale to the model's speed)")
    ap.add_argument("--tpot-slo", type=float, default=0.0)
    ap.add_argument("--ttft-scale", type=float, default=5.0)
    ap.add_argument("--tpot-scale", type=float, default=4.0)
    ap.add_argument("--target", type=float, default=0.9, help="attainment goal for goodput")
    ap.add_argument("--rel-tol", type=float, default=0.1, help="goodput bisection tolerance (relative)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/serving")
    args = ap.parse_args(argv)

    model = args.model if os.path.isdir(args.model) else get_model(args.model)
    model_config = ModelConfig.from_pretrained(model)
    base_trace = make_trace(
        args.workload, 1.0, args.n, args.seed, scale=args.scale, max_model_len=model_config.max_model_len
    )
    rates = sorted(float(r) for r in args.rates.split(","))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {
        "workload": args.workload,
        "scale": args.scale,
        "n": args.n,
        "seed": args.seed,
        "cores": args.cores,
        "model": os.path.basename(model),
        "target": args.target,
        "configs": {},
        "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in base_trace),
        "mean_output_tokens": statistics.fmean(r.output_tokens for r in base_trace),
    }
    slo = {"ttft": args.ttft_slo, "tpot": args.tpot_slo}
    started = time.monotonic()
    for name in tqdm(args.configs.split(","), desc="configurations"):
        spec = cluster_spec(
            name, model, args.cores, os.path.join(os.path.dirname(args.out) or ".", f"logs-{name}"), args.kv_cache_gb
        )
        with ConfigRunner(name, spec, base_trace, model_config.vocab_size, args.seed) as runner:
            ttft0, tpot0, e2e0 = runner.unloaded()
            if not slo["ttft"] or not slo["tpot"]:
                slo = {
                    "ttft": slo["ttft"] or ttft0 * args.ttft_scale,
                    "tpot": slo["tpot"] or tpot0 * args.tpot_scale,
                    "calibrated_on": name,
                    "unloaded_ttft": ttft0,
                    "unloaded_tpot": tpot0,
                }
            max_rate = steady_state_limit(args.n, e2e0)
            for rate in tqdm([r for r in rates if r <= max_rate], desc=f"{name} sweep", leave=False):
                runner.run(rate)
            best, capped = goodput(runner, rates, slo["ttft"], slo["tpot"], args.target, args.rel_tol, max_rate)
            result["configs"][name] = {
                "goodput": best,
                "goodput_is_lower_bound": capped,
                "max_probed_rate": max_rate,
                "runs": {
                    str(rate): {
                        "summary": summarize(res, slo["ttft"], slo["tpot"]),
                        "requests": [asdict(r) for r in res],
                    }
                    for rate, res in sorted(runner.runs.items())
                },
            }
        tqdm.write(f"{name}: goodput {'>= ' if capped else ''}{best:.2f} req/s at {args.target:.0%} attainment")
    result["slo"] = slo
    result["cdf_rate"] = max(
        (r for r in rates if all(str(r) in c["runs"] for c in result["configs"].values())),
        key=lambda r: -abs(r - statistics.median(rates)),
        default=rates[0],
    )
    goodputs = {n: c["goodput"] for n, c in result["configs"].items()}
    if {"colocated", "disaggregated"} <= goodputs.keys() and goodputs["colocated"] > 0:
        result["goodput_ratio_disaggregated_over_colocated"] = goodputs["disaggregated"] / goodputs["colocated"]
    result["seconds"] = time.monotonic() - started
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    pngs = plot(result, args.out)
    print_table(result)
    print(f"wrote {args.out}.json, {', '.join(pngs)}")
    return result


def print_table(result: dict) -> None:
    slo = result["slo"]
    print(
        f"\n{result['workload']} (scale {result['scale']}, mean prompt {result['mean_prompt_tokens']:.0f} / "
        f"output {result['mean_output_tokens']:.0f} tokens), {result['n']} requests per rate, {result['cores']} cores"
    )
    print(f"SLO: TTFT {slo['ttft'] * 1e3:.1f} ms, TPOT {slo['tpot'] * 1e3:.2f} ms; target {result['target']:.0%}")
    print(f"{'config':<14} {'rate':>6} {'attain':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}")
    for name, cfg in result["configs"].items():
        for rate, run in cfg["runs"].items():
            s = run["summary"]
            print(
                f"{name:<14} {float(rate):>6.2f} {s['attainment']:>7.2f} {s['ttft_p50'] * 1e3:>8.1f}m "
                f"{s['ttft_p99'] * 1e3:>8.1f}m {s['tpot_p50'] * 1e3:>8.2f}m {s['tpot_p99'] * 1e3:>8.2f}m"
            )
        bound = ">= " if cfg.get("goodput_is_lower_bound") else ""
        print(
            f"{name:<14} goodput {bound}{cfg['goodput']:.2f} req/s"
            + (
                f" (a {result['n']}-request trace cannot probe past {cfg['max_probed_rate']:.2f} req/s)"
                if bound
                else ""
            )
        )
    if "goodput_ratio_disaggregated_over_colocated" in result:
        print(f"goodput ratio disaggregated / colocated: {result['goodput_ratio_disaggregated_over_colocated']:.2f}")


if __name__ == "__main__":
    main()
