"""Does the planner's simulator predict the real system? (DistServe reports < 2 points of error.)

    python -m bench.planner_validation --rates 2,3,4,5,6

1. Profile the engine exactly as the real workers run it: one thread, pinned to one core, in a
   separate process (`pdserve plan profile --threads 1`).
2. Start the real disaggregated cluster (prefill pinned to core 0, decode to core 1, as in
   bench.serving; with --pin-serving, the default, the router, the kvstore daemon and the load
   generator share core 0 with prefill, so the decode core runs the decode worker alone) and refit
   the latency model on it as a client sees it: TTFT of single prompts of several lengths, TPOT of
   B streams decoding together, and the handoff (first to second token of 2-token requests, less
   one decode step: the router's Decode call, the KV pull, admission) (system_profile below).
   This is the only calibration; no rate of the validation is used for it.
   The serving processes' work grows with the generated-token rate and shares the workers' cores,
   so engine times stretch under load. One number models it: every engine time is multiplied by
   1 + gamma * (tokens/s), gamma fitted so that the simulated mean TPOT matches the measured one at
   --calibration-rate (kept out of the validation rates). On GPUs, where serving processes do not
   share the accelerator, gamma is 0.
3. At every validation rate, replay the same trace on the real cluster and in the simulator;
   compare SLO attainment. Writes JSON and a PNG, prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from dataclasses import asdict, replace

from services.common.flags import pin_to_cpus
from services.common.trace import TraceRequest, make_trace, rescale_rate
from services.engine import ModelConfig
from services.engine.testmodels import get_model
from services.planner.latency_model import LatencyProfile, Overheads, fit_decode, fit_prefill
from services.planner.simulator import SimConfig, Slo, simulate

from .loadgen import attainment, percentile, run_trace
from .serving import ConfigRunner, cluster_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_profile(model: str, out: str, core: int) -> LatencyProfile:
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "services.planner", "profile", "--model", model,
           "--threads", "1", "--out", out]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return LatencyProfile.load(out)


def system_profile(profile: LatencyProfile, runner: ConfigRunner) -> tuple[LatencyProfile, dict]:
    """Refits the latency model on the running cluster, as a client sees it.

    Prefill: TTFT of single prompts of several lengths (router, gRPC and sampling included).
    Decode: TPOT of B streams decoding together, for several B. On this 2-core machine a pinned
    worker shares its core with its own gRPC thread, and the router and load generator float over
    both cores, so the per-sequence cost of a step is far above the bare engine's; measuring it
    on the system is how DistServe profiles too (on the serving instances themselves)."""
    vocab = runner.vocab
    prefill_samples = []
    for i, length in enumerate((8, 32, 64, 128, 256, 512, 768, 1024) * 2):
        one = [TraceRequest(0.0, length, 1, request_id=f"pf-{i}")]
        (r,) = run_trace(runner.router, one, vocab, seed=1000 + i, progress=False)
        prefill_samples.append(([length], r.ttft))
    decode_samples = []
    prompt, output = 128, 96
    for batch in (1, 2, 4, 8, 16, 24, 32):
        burst = [TraceRequest(0.0, prompt, output, request_id=f"dc-{batch}-{j}") for j in range(batch)]
        results = run_trace(runner.router, burst, vocab, seed=2000 + batch, progress=False)
        tpot = statistics.median(r.tpot for r in results if r.ok)
        decode_samples.append((batch, batch * (prompt + output // 2), tpot))
    prefill, prefill_fit = fit_prefill(prefill_samples)
    decode, decode_fit = fit_decode(decode_samples)
    # Handoff: the gap between a request's first token (from prefill) and its second (the first
    # decode step, after the router's Decode call, the KV pull and admission), less that step.
    gaps = []
    for i in range(8):
        one = [TraceRequest(0.0, 64, 2, request_id=f"ho-{i}")]
        (r,) = run_trace(runner.router, one, vocab, seed=3000 + i, progress=False)
        gaps.append(r.tpot)
    handoff = max(0.0, statistics.median(gaps) - decode.step_time(1, 65))
    fitted = replace(profile, prefill=prefill, decode=decode, overheads=Overheads(handoff_s=handoff))
    return fitted, {"prefill": asdict(prefill), "prefill_fit": prefill_fit, "decode": asdict(decode),
                    "decode_fit": decode_fit, "handoff_s": handoff, "handoff_gaps": gaps,
                    "prefill_samples": prefill_samples, "decode_samples": decode_samples,
                    "engine_only": {"prefill": asdict(profile.prefill), "decode": asdict(profile.decode)}}


def contended(profile: LatencyProfile, factor: float) -> LatencyProfile:
    """The profile with every engine time scaled by `factor` (CPU shared with serving processes)."""
    scale = lambda lat: type(lat)(lat.a * factor, lat.b * factor, lat.c * factor)  # noqa: E731
    return replace(profile, prefill=scale(profile.prefill), decode=scale(profile.decode))


def fit_contention(profile: LatencyProfile, trace, rate: float, measured: list, mean_output: float) -> float:
    """gamma in factor = 1 + gamma * (generated tokens/s): the one number that makes the simulated
    mean TPOT at the calibration rate equal the measured one (bisection; TPOT rises with gamma)."""
    target = statistics.fmean(r.tpot for r in measured if r.ok and r.tokens > 1)
    tokens_per_s = rate * mean_output
    lo, hi = 0.0, 10.0 / tokens_per_s
    replay = rescale_rate(trace, rate, from_rate=1.0)
    for _ in range(30):
        mid = (lo + hi) / 2
        sim = simulate(_config(contended(profile, 1 + mid * tokens_per_s)), replay, Slo())
        if float(np.nanmean(sim.tpot_s[sim.output_tokens > 1])) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _config(profile: LatencyProfile) -> SimConfig:
    # the workers' own batching limits (their flag defaults), not the profile's suggestion
    return SimConfig(mode="disaggregated", prefill_profile=profile, decode_profile=profile, num_prefill=1,
                     num_decode=1, prefill_token_budget=8192, decode_max_num_seqs=256)


def _quantiles(ttft: list[float], tpot: list[float]) -> dict:
    return {f"{name}_p{int(p * 100)}": percentile(values, p)
            for name, values in (("ttft", ttft), ("tpot", tpot)) for p in (0.5, 0.9, 0.99)}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["rate"] for r in rows], [r["measured"] for r in rows], "o-", label="measured (real cluster)")
    ax.plot([r["rate"] for r in rows], [r["simulated"] for r in rows], "s--", label="simulated (planner)")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.02),
           title=f"simulator vs real system: max |error| {result['max_abs_error_points']:.1f} points")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-serve")
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--rates", default="1.5,2.5,3,4,5", help="validation rates")
    ap.add_argument("--calibration-rate", type=float, default=2.0,
                    help="the one rate whose mean TPOT fits the CPU-contention factor (not a validation rate)")
    ap.add_argument("--ttft-scale", type=float, default=5.0, help="SLO = scale x unloaded latency (as bench.serving)")
    ap.add_argument("--tpot-scale", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pin-serving", action=argparse.BooleanOptionalAction, default=True,
                    help="run the router, kvstore and load generator on the prefill core, so that the decode "
                         "core runs the decode worker alone (--no-pin-serving: they float over both cores)")
    ap.add_argument("--out", default="results/planner-validation")
    args = ap.parse_args(argv)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    model = args.model if os.path.isdir(args.model) else get_model(args.model)
    mc = ModelConfig.from_pretrained(model)
    trace = make_trace(args.workload, 1.0, args.n, args.seed, scale=args.scale, max_model_len=mc.max_model_len)
    rates = [float(r) for r in args.rates.split(",")]
    started = time.monotonic()
    profile = measure_profile(model, args.out + "-profile.json", core=1)

    if args.pin_serving:  # the load generator (this process) joins the router and kvstore on core 0
        pin_to_cpus({0})
    spec = cluster_spec("disaggregated", model, 2, os.path.join(os.path.dirname(args.out) or ".", "logs-validation"), 0.25,
                        pin_serving_to_prefill=args.pin_serving)
    with ConfigRunner("disaggregated", spec, trace, mc.vocab_size, args.seed) as runner:
        ttft0, tpot0, _ = runner.unloaded()
        slo = Slo(ttft0 * args.ttft_scale, tpot0 * args.tpot_scale)
        profile, calibration = system_profile(profile, runner)
        mean_output = statistics.fmean(r.output_tokens for r in trace)
        gamma = fit_contention(profile, trace, args.calibration_rate, runner.run(args.calibration_rate), mean_output)
        calibration["contention_gamma_s_per_token"] = gamma
        calibration["calibration_rate"] = args.calibration_rate
        rows = []
        for rate in rates:
            replay = rescale_rate(trace, rate, from_rate=1.0)
            real = runner.run(rate)
            sim = simulate(_config(contended(profile, 1 + gamma * rate * mean_output)), replay, slo)
            measured, simulated = attainment(real, slo.ttft_s, slo.tpot_s), sim.attainment
            rows.append({"rate": rate, "measured": measured, "simulated": simulated,
                         "error_points": 100 * (simulated - measured),
                         "measured_latency": _quantiles([r.ttft for r in real if r.ok], [r.tpot for r in real if r.ok]),
                         "simulated_latency": _quantiles(list(sim.ttft_s), list(sim.tpot_s))})
            print(f"rate {rate:5.2f}: measured {measured:.3f}, simulated {simulated:.3f}, "
                  f"error {100 * (simulated - measured):+.1f} points", flush=True)
    result = {
        "model": os.path.basename(model), "workload": args.workload, "scale": args.scale, "n": args.n,
        "pin_serving": args.pin_serving,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "unloaded_ttft_s": ttft0, "unloaded_tpot_s": tpot0},
        "system_profile": calibration,
        "rows": rows, "max_abs_error_points": max(abs(r["error_points"]) for r in rows),
        "seconds": time.monotonic() - started,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out + ".png")
    print(f"max |simulated - measured| = {result['max_abs_error_points']:.1f} points; wrote {args.out}.json/.png")
    return result


if __name__ == "__main__":
    main()
