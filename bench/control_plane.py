"""How much load one router carries (issue 15's study 2): clusters of 8, 32 and 64 emulated
workers at a GPU's own timings, offered more requests per second step by step, until the router's
own share of TTFT passes 5 ms at p99.

    python -m bench.control_plane                       # 8, 32 and 64 workers
    python -m bench.control_plane --workers 8 --step-seconds 10

Each cluster: a quarter of the workers prefill, the rest decode, over one emulated node per 8
workers (KV over UCX between nodes), every engine emulated at the profile's timings (not slowed:
the engines are never what limits here). At each rate the code workload (prompts ~150, outputs
~100 tokens) is replayed open-loop for --step-seconds. Measured per rate:
- the router's own share of TTFT (Timing.router_seconds: TTFT less the worker's queue and
  compute; tokenizing, dispatch, the RPCs, relaying the first token), p50 and p99;
- CPU seconds per request and per generated token of the router, the workers, the kvstore
  daemons and this load generator (from /proc), and how busy the machine's cores were;
- TTFT and TPOT at the client against the profile's unloaded values.
The sweep goes on past the first rate whose p99 passes --limit-ms (the rate one router sustains
within that limit) until the p99 passes --stop-ms or a request fails, to show how the router
degrades and what saturates first (`breaks`: the busiest group at the last rate). Everything runs
on this machine's cores, the load generator included. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from services.common.latency_profile import LatencyProfile
from services.launcher import Cluster, ClusterSpec
from services.planner.workload import make_trace
from services.tiny_models import get_model

from .emulated_fidelity import DEFAULT_PROFILE, MODEL
from .loadgen import percentile, run_trace

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int, tid: int | str | None) -> tuple[int, int]:
    """(user, system) clock ticks of a process or of its thread `tid` so far ((0, 0) when gone)."""
    try:
        with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


def cpu_seconds(pid: int, tid: int | str | None = None) -> float:
    """User + system CPU time of a process (or of its thread `tid`) so far (0 when it is gone)."""
    return sum(_cpu_ticks(pid, tid)) / TICKS


def kernel_cpu_seconds(pid: int) -> float:
    """The system (kernel) part of a process's CPU time so far: for the router, mostly the socket
    writes and wake-ups behind each message."""
    return _cpu_ticks(pid, None)[1] / TICKS


def scrape(metrics_address: str, **labels: str) -> dict[str, float]:
    """A service's Prometheus samples now, by sample name, each summed over the samples whose labels
    include `labels`."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if labels.items() <= sample.labels.items():
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS  # all but idle and iowait


def cpu_by_group(cluster: Cluster) -> dict[str, float]:
    groups: dict[str, float] = {"router": 0.0, "workers": 0.0, "kvstore": 0.0}
    for proc in cluster.procs:
        group = "router" if proc.role == "router" else "kvstore" if proc.role == "kvstore" else "workers"
        groups[group] += cpu_seconds(proc.pid)
    groups["load generator"] = cpu_seconds(os.getpid())
    groups["machine"] = machine_busy_seconds()
    return groups


def run_size(args, workers: int, profile_path: str, profile: LatencyProfile) -> dict:
    prefill = max(1, workers // 4)
    spec = ClusterSpec(
        model=get_model(MODEL),
        prefill=prefill,
        decode=workers - prefill,
        nodes=max(2, workers // 8),
        router_port=0,
        log_dir=os.path.join(args.out_dir, "logs", f"workers-{workers}"),
        profiles={"prefill": profile_path, "decode": profile_path},
        worker_args=["--stream-interval", str(args.stream_interval)],
    )
    cluster = Cluster(spec)
    started = time.monotonic()
    cluster.start(progress=lambda line: None)
    start_seconds = time.monotonic() - started
    print(f"{workers} workers ({prefill} prefill) on {spec.nodes} nodes: started in {start_seconds:.0f} s", flush=True)
    points = []
    try:
        router = cluster.info()["router"]
        run_trace(router, make_trace("code", 50.0, 20, seed=99), 1024, progress=False)  # warm up
        rate = args.start_rate
        for step in itertools.count(1):
            n = max(20, int(rate * args.step_seconds))
            trace = make_trace("code", rate, n, seed=args.seed, max_model_len=4096)
            before = cpu_by_group(cluster)
            wall = time.monotonic()
            results = run_trace(router, trace, 1024, seed=args.seed + step, progress=False, timeout=120)
            wall = time.monotonic() - wall
            after = cpu_by_group(cluster)
            ok = [r for r in results if r.ok]
            tokens = sum(r.tokens for r in ok)
            cpu = {group: after[group] - before[group] for group in before}
            overhead = [r.router_ttft - r.queue - r.prefill for r in ok]
            point = {
                "rate": rate,
                "requests": n,
                "errors": len(results) - len(ok),
                "token_rate": tokens / wall,
                "router_ms_p50": 1000 * percentile(overhead, 0.5),
                "router_ms_p99": 1000 * percentile(overhead, 0.99),
                "ttft_ms_p50": 1000 * percentile([r.ttft for r in ok], 0.5),
                "tpot_ms_p50": 1000 * percentile([r.tpot for r in ok if r.tokens > 1], 0.5),
                "cpu_ms_per_request": {g: 1000 * v / max(1, len(ok)) for g, v in cpu.items() if g != "machine"},
                "cpu_us_per_token": {g: 1e6 * v / max(1, tokens) for g, v in cpu.items() if g != "machine"},
                "cores_busy": cpu["machine"] / wall,
                "cores_by_group": {g: v / wall for g, v in cpu.items() if g != "machine"},
            }
            points.append(point)
            print(
                f"  {rate:7.1f} req/s  {point['token_rate']:8.0f} tok/s  router p50 {point['router_ms_p50']:.2f} ms "
                f"p99 {point['router_ms_p99']:.2f} ms  TPOT p50 {point['tpot_ms_p50']:.1f} ms  "
                f"cores busy {point['cores_busy']:.2f}  errors {point['errors']}",
                flush=True,
            )
            if point["errors"] or point["router_ms_p99"] > args.stop_ms or rate * args.factor > args.max_rate:
                break
            rate *= args.factor
    finally:
        cluster.stop()
    within = []  # the rates before the first one past the limit
    for p in points:
        if p["errors"] or p["router_ms_p99"] > args.limit_ms:
            break
        within.append(p)
    last = points[-1]
    busiest = max(last["cores_by_group"], key=last["cores_by_group"].get)
    return {
        "workers": workers,
        "prefill": prefill,
        "nodes": spec.nodes,
        "start_seconds": start_seconds,
        "max_rate": within[-1]["rate"] if within else 0.0,
        "max_token_rate": within[-1]["token_rate"] if within else 0.0,
        "peak_token_rate": max((p["token_rate"] for p in points if not p["errors"]), default=0.0),
        "breaks": f"{busiest} ({last['cores_by_group'][busiest]:.2f} of {os.cpu_count()} cores; "
        f"all busy: {last['cores_busy']:.2f})",
        "points": points,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for size in result["sizes"]:
        rates = [p["rate"] for p in size["points"]]
        left.plot(rates, [p["router_ms_p99"] for p in size["points"]], "o-", label=f"{size['workers']} workers")
        right.plot(
            rates, [p["cpu_us_per_token"]["router"] for p in size["points"]], "o-", label=f"{size['workers']} workers"
        )
    left.axhline(result["limit_ms"], color="grey", ls=":", lw=0.8)
    left.set(xscale="log", yscale="log", xlabel="requests/s", ylabel="router share of TTFT, p99 (ms)")
    right.set(xscale="log", xlabel="requests/s", ylabel="router CPU per generated token (us)")
    left.set_title(f"emulated at {result['device']} timings; measured on this CPU", fontsize=9)
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=DEFAULT_PROFILE)
    ap.add_argument("--workers", default="8,32,64")
    ap.add_argument("--start-rate", type=float, default=10.0)
    ap.add_argument("--factor", type=float, default=1.5, help="each rate this much above the last")
    ap.add_argument("--step-seconds", type=float, default=15.0, help="seconds of arrivals per rate")
    ap.add_argument("--limit-ms", type=float, default=5.0)
    ap.add_argument("--stop-ms", type=float, default=100.0, help="end the sweep once the p99 passes this")
    ap.add_argument("--max-rate", type=float, default=2000.0, help="and never offer more than this")
    ap.add_argument("--stream-interval", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="results/control-plane")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    profile = LatencyProfile.load(args.profile)
    sizes = [run_size(args, int(w), args.profile, profile) for w in args.workers.split(",")]
    result = {
        "profile": args.profile,
        "device": profile.device,
        "limit_ms": args.limit_ms,
        "stop_ms": args.stop_ms,
        "stream_interval": args.stream_interval,
        "cores": os.cpu_count(),
        "sizes": sizes,
    }
    with open(os.path.join(args.out_dir, "control-plane.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out_dir, "control-plane.png"))
    for size in sizes:
        print(
            f"{size['workers']:3d} workers: up to {size['max_rate']:.1f} req/s ({size['max_token_rate']:.0f} tok/s) "
            f"with the router's p99 share of TTFT <= {args.limit_ms:g} ms; peak {size['peak_token_rate']:.0f} tok/s; "
            f"breaks: {size['breaks']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
