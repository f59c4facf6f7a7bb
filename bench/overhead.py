"""The serving path's own cost per streamed token (issue 16), for one checkout or two side by side.

    python -m bench.overhead                                  # this checkout
    git worktree add /tmp/pdserve-base <commit>
    python -m bench.overhead --base /tmp/pdserve-base         # base against this checkout (head)
    python -m bench.overhead --routers 2                      # two routers over the same workers
    python -m bench.overhead --apis grpc,http                 # gRPC streams and SSE streams side by side

Each checkout runs its own `pdserve up` (one router, one prefill and one decode worker, one
kvstore daemon, every engine emulated at the analytic H100 Llama-3-8B profile: no model runs, a
decode step sleeps the profile's time, so what the processes spend on the CPU is the serving path,
not the model). Both clusters stay up; trials alternate between them (base, head, head, base, ...)
so both see the same machine. A trial opens --streams concurrent Generate streams at once through
the router (short token-id prompts, --tokens tokens each, the decode worker at --stream-interval)
and reads every message; with --apis grpc,http (the default) each checkout also runs the same
trials as server-sent event streams through the router's OpenAI-compatible HTTP API
(/v1/completions, stream=true), alternating with the gRPC ones, so the SSE path's cost per token
is measured next to gRPC's (a checkout without the HTTP API runs gRPC only). Measured per trial,
from /proc and the decode worker's metrics:
- router CPU per streamed token (and the part of it in the kernel: socket writes and wake-ups),
  and the token rate the whole path reached;
- decode worker CPU per token, all of it (the emulated engine's call is a sleep and a hash per
  sequence), and outside the engine call: less the CPU its engine thread spent inside engine.run
  (pdserve_decode_engine_cpu_seconds_total), the serving path alone;
- the client's inter-message gaps (p50, p99) against the decode worker's mean step time;
- the router's own delay per token (p50, p99 of pdserve_router_token_relay_seconds over the trial,
  read from its buckets as histogram_quantile does): from the decode worker's message reaching the
  router to the router starting the client's message.
Everything, the load generator included, shares this machine's cores: token rates are what the
path reached here, CPU per token is what it costs. Medians over rounds, and head/base ratios.
Writes JSON and a PNG to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

from .control_plane import cpu_seconds, kernel_cpu_seconds, scrape
from .emulated_fidelity import DEFAULT_PROFILE
from .loadgen import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_TOKENS = 16


@dataclass
class Side:
    name: str
    checkout: str
    proc: subprocess.Popen
    info: dict

    def pid(self, role: str) -> int:
        return next(s["pid"] for s in self.info["services"] if s["role"] == role)

    def routers(self) -> list[dict]:
        return [s for s in self.info["services"] if s["role"] == "router"]

    def metrics(self, role: str) -> str:
        return next(s["metrics"] for s in self.info["services"] if s["role"] == role)


def generate_stubs(checkout: str) -> None:
    """A checkout's gRPC stubs (git-ignored), as `make protos` makes them: without them its
    services would import this checkout's."""
    v1 = os.path.join(checkout, "pdserve", "v1")
    if os.path.exists(os.path.join(v1, ".generated")):
        return
    protos = sorted(f"protos/pdserve/v1/{f}" for f in os.listdir(os.path.join(checkout, "protos", "pdserve", "v1")))
    os.makedirs(v1, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", "--python_out=.", "--grpc_python_out=.", *protos],
        cwd=checkout,
        check=True,
    )
    for path in (os.path.join(checkout, "pdserve", "__init__.py"), os.path.join(v1, "__init__.py")):
        open(path, "a").close()
    open(os.path.join(v1, ".generated"), "w").close()


def start_side(name: str, checkout: str, args, workdir: str) -> Side:
    generate_stubs(checkout)
    ready = os.path.join(workdir, f"{name}-ready.json")
    argv = [sys.executable, "-m", "services.cli", "up", "--emulate", os.path.abspath(args.profile)]
    argv += ["--port", "0", "--ready-file", ready, "--log-dir", os.path.join(workdir, f"{name}-logs")]
    if _has_flag(checkout, "--http-port"):  # (a base checkout from before the HTTP API has no such flag)
        argv += ["--http-port", "0"]
    argv += ["--on-exit", "stop", f"--worker-arg=--stream-interval {args.stream_interval}"]
    if args.routers > 1:
        argv += ["--routers", str(args.routers)]
    env = dict(os.environ, PYTHONPATH=checkout)
    log = os.path.join(workdir, f"{name}-up.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name}: pdserve up did not start; see {log}")
        time.sleep(0.2)
    with open(ready) as f:
        return Side(name, checkout, proc, json.load(f))


def _has_flag(checkout: str, flag: str) -> bool:
    with open(os.path.join(checkout, "services", "cli", "up.py")) as f:
        return f'"{flag}"' in f.read()


def stop_side(side: Side) -> None:
    side.proc.send_signal(signal.SIGINT)
    try:
        side.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        side.proc.kill()


def engine_thread_cpu(pid: int) -> float:
    """CPU seconds of a worker's engine thread (named "<role>-engine", runtime/engine_thread.py):
    scheduling, the engine call and handing tokens over, in series with the device's step; the
    rest of the process (its asyncio loop) runs while the step does."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if not f.read().strip().endswith("-engine"):
                    continue
        except OSError:
            continue
        total += cpu_seconds(pid, tid)
    return total


def decode_steps(side: Side) -> tuple[float, float, float]:
    """The decode worker's decode steps so far, from its Prometheus endpoint: (seconds, count, CPU
    seconds inside the engine's calls; nan for a checkout that does not count those)."""
    steps = scrape(side.metrics("decode"), kind="decode")
    engine_cpu = scrape(side.metrics("decode")).get("pdserve_decode_engine_cpu_seconds_total", math.nan)
    return (
        steps.get("pdserve_decode_step_duration_seconds_sum", 0.0),
        steps.get("pdserve_decode_step_duration_seconds_count", 0.0),
        engine_cpu,
    )


async def _stream(stub, index: int, tokens: int, gaps: list[float]) -> int:
    request = router_pb2.GenerateRequest(
        token_ids=[3 + (index * 7 + i) % 200 for i in range(PROMPT_TOKENS)],
        sampling=common_pb2.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
    )
    received, last = 0, None
    async for response in stub.Generate(request, timeout=120):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
        received += len(response.token_ids)
    return received


async def _sse_stream(session, url: str, index: int, tokens: int, gaps: list[float]) -> int:
    """One /v1/completions SSE stream: its tokens (from the usage event), its inter-event gaps."""
    body = {
        "prompt": [3 + (index * 7 + i) % 200 for i in range(PROMPT_TOKENS)],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    received, last = 0, None
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                received = event["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    return received


async def _trial_http(addresses: list[str], streams: int, tokens: int) -> tuple[int, list[float]]:
    import aiohttp

    gaps: list[float] = []
    urls = [f"http://{address}/v1/completions" for address in addresses]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        counts = await asyncio.gather(
            *(_sse_stream(session, urls[i % len(urls)], i, tokens, gaps) for i in range(streams))
        )
    return sum(counts), gaps


async def _trial(routers: list[str], streams: int, tokens: int) -> tuple[int, list[float]]:
    """The streams spread evenly over the routers (each router's own address)."""
    gaps: list[float] = []
    channels = [grpc.aio.insecure_channel(address) for address in routers]
    try:
        stubs = [router_pb2_grpc.RouterStub(channel) for channel in channels]
        counts = await asyncio.gather(*(_stream(stubs[i % len(stubs)], i, tokens, gaps) for i in range(streams)))
    finally:
        for channel in channels:
            await channel.close()
    return sum(counts), gaps


RELAY = "pdserve_router_token_relay_seconds"


def relay_buckets(side: Side, api: str) -> dict[float, float]:
    """The routers' buckets of their delay per token (RELAY) for one API, summed: upper bound ->
    cumulative count. Empty for a checkout without the metric."""
    buckets: dict[float, float] = {}
    for router in side.routers():
        text = urllib.request.urlopen(f"http://{router['metrics']}/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            if family.name != RELAY:
                continue
            for sample in family.samples:
                if sample.name == RELAY + "_bucket" and sample.labels.get("api") == api:
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile of what a histogram counted between two scrapes, as Prometheus's
    histogram_quantile reads buckets: linear within the bucket it falls in. NaN when none."""
    bounds = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in bounds]
    if not counts or counts[-1] <= 0:
        return math.nan
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for le, count in zip(bounds, counts, strict=True):
        if count >= rank and count > below:
            return lower if math.isinf(le) else lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def emulated_engine_us_per_token() -> float:
    """What the emulated engine's own call costs per token (its token function, timed here): the
    part of the decode worker's CPU that is the "engine call", not the serving path."""
    from services.engine.emulated import emulated_token

    started, n = time.perf_counter(), 20000
    for i in range(n):
        emulated_token(0x1234, i, 0, 32000, (2,))
    return 1e6 * (time.perf_counter() - started) / n


def trial(side: Side, streams: int, tokens: int, api: str = "grpc") -> dict:
    pids = {role: side.pid(role) for role in ("decode", "prefill", "kvstore")}
    routers = side.routers()
    relay_before = relay_buckets(side, api)  # (before the CPU counts: serving the scrape is not the path's)
    cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    cpu_before["router"] = sum(cpu_seconds(r["pid"]) for r in routers)
    router_kernel_before = sum(kernel_cpu_seconds(r["pid"]) for r in routers)
    engine_before = engine_thread_cpu(pids["decode"])
    steps_before = decode_steps(side)
    wall = time.perf_counter()
    try:
        if api == "http":  # (several routers share the one HTTP port)
            received, gaps = asyncio.run(_trial_http([side.info["http"]], streams, tokens))
        else:
            received, gaps = asyncio.run(_trial([r["grpc"] for r in routers], streams, tokens))
    except grpc.aio.AioRpcError as exc:
        raise RuntimeError(f"{side.name}: a stream failed: {exc.code().name} {exc.details()}") from None
    wall = time.perf_counter() - wall
    cpu = {role: cpu_seconds(pid) - cpu_before[role] for role, pid in pids.items()}
    cpu["router"] = sum(cpu_seconds(r["pid"]) for r in routers) - cpu_before["router"]
    router_kernel = sum(kernel_cpu_seconds(r["pid"]) for r in routers) - router_kernel_before
    relay_after = relay_buckets(side, api)
    engine_thread = engine_thread_cpu(pids["decode"]) - engine_before
    steps_after = decode_steps(side)
    step_count = steps_after[1] - steps_before[1]
    if received != streams * tokens:
        raise RuntimeError(f"{side.name}: received {received} tokens of {streams * tokens}")
    return {
        "tokens": received,
        "token_rate": received / wall,
        "router_us_per_token": 1e6 * cpu["router"] / received,  # all routers together
        "router_kernel_us_per_token": 1e6 * router_kernel / received,  # of it, in the kernel
        "decode_us_per_token": 1e6 * cpu["decode"] / received,
        # of which on the engine thread, in series with the step (0 for a checkout whose engine
        # thread has no OS name)
        "decode_engine_thread_us_per_token": 1e6 * engine_thread / received,
        # the serving path alone (the "everything but the engine call"): the decode
        # worker's CPU less what its engine thread spent inside engine.run
        "decode_serving_us_per_token": 1e6 * (cpu["decode"] - (steps_after[2] - steps_before[2])) / received,
        "other_us_per_token": 1e6 * (cpu["prefill"] + cpu["kvstore"]) / received,
        "step_ms_mean": 1000 * (steps_after[0] - steps_before[0]) / max(1, step_count),
        "gap_ms_p50": 1000 * percentile(gaps, 0.5),
        "gap_ms_p99": 1000 * percentile(gaps, 0.99),
        # what the router added to each message after a request's first (its relay histogram)
        "relay_ms_p50": 1000 * bucket_quantile(relay_before, relay_after, 0.5),
        "relay_ms_p99": 1000 * bucket_quantile(relay_before, relay_after, 0.99),
    }


METRICS = (
    "router_us_per_token",
    "router_kernel_us_per_token",
    "decode_us_per_token",
    "decode_engine_thread_us_per_token",
    "decode_serving_us_per_token",
    "token_rate",
    "step_ms_mean",
    "gap_ms_p50",
    "gap_ms_p99",
    "relay_ms_p50",
    "relay_ms_p99",
)


def summarize(trials: dict[str, list[dict]], names: list[str]) -> dict:
    out: dict = {}
    for name in names:
        out[name] = {m: statistics.median(t[m] for t in trials[name]) for m in METRICS}

    def ratio(top: str, bottom: str) -> dict:
        # ratios per round (trials were paired), then their median
        return {
            m: statistics.median(
                t[m] / b[m] if b[m] else math.nan for b, t in zip(trials[bottom], trials[top], strict=True)
            )
            for m in METRICS
        }

    if "base" in names and "head" in names:
        out["head_over_base"] = ratio("head", "base")
    if "head" in names and "head-http" in names:
        out["http_over_grpc"] = ratio("head-http", "head")
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["streams"] for r in results["points"]]
    names = results["sides"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    # (hatched: the part of a bar's figure in this metric, where counted)
    parts = {"router_us_per_token": "router_kernel_us_per_token", "decode_us_per_token": "decode_serving_us_per_token"}
    for ax, metric, ylabel in zip(
        axes,
        ("router_us_per_token", "decode_us_per_token", "gap_ms_p99", "relay_ms_p99"),
        (
            "router CPU per token (us)",
            "decode worker CPU per token (us)",
            "client inter-message gap p99 (ms)",
            "router delay per token p99 (ms)",
        ),
        strict=True,
    ):
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            values = [p["summary"][name][metric] for p in results["points"]]
            commit = results["commits"].get(name.split("-")[0])
            label = f"{name} ({commit})" if commit else name
            xs = [i + k * width for i in range(len(batches))]
            ax.bar(xs, values, width, label=label, color=f"C{k}")
            if metric in parts:
                part = [p["summary"][name].get(parts[metric], math.nan) for p in results["points"]]
                if not any(math.isnan(v) for v in part):
                    ax.bar(xs, part, width, fill=False, hatch="//", edgecolor="black", linewidth=0)
        ax.set_xticks(
            [i + width * (len(names) - 1) / 2 for i in range(len(batches))], [f"{b} streams" for b in batches]
        )
        ax.set_ylabel(ylabel)
    axes[3].axhline(2.0, color="gray", linestyle="--", linewidth=1)  # the bound at p99
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names))
    fig.suptitle(
        "serving path per streamed token, measured on this CPU (engines emulated at H100 timings);\n"
        "hatched: the router's CPU in the kernel; the decode worker's outside the engine call. Dashed: 2 ms"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="", help="another checkout to compare against (its own pdserve up)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE)
    ap.add_argument("--streams", default="64,256", help="concurrent streams per trial, comma-separated")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--routers",
        type=int,
        default=1,
        help="routers per cluster (pdserve up --routers; the streams spread over them): tokens/s against "
        "--routers 1 shows the scale-out on a machine with a core per router (both checkouts need the flag)",
    )
    ap.add_argument(
        "--apis",
        default="grpc,http",
        help="client APIs to stream through: grpc (Generate streams), http (SSE from /v1/completions)",
    )
    ap.add_argument("--out", default="results/overhead")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    checkouts = ([("base", os.path.abspath(args.base))] if args.base else []) + [("head", ROOT)]
    workdir = tempfile.mkdtemp(prefix="pdserve-overhead-")
    sides = []
    try:
        for name, checkout in checkouts:
            print(f"starting {name} ({checkout})", flush=True)
            sides.append(start_side(name, checkout, args, workdir))
        # (side, api, name): a checkout without the HTTP API (no "http" in its ready file) runs gRPC only
        variants = [
            (side, api, side.name if api == "grpc" else f"{side.name}-{api}")
            for side in sides
            for api in args.apis.split(",")
            if api == "grpc" or side.info.get("http")
        ]
        for side, api, _ in variants:
            trial(side, 8, 16, api)  # warm up: connections, first-call paths
        points = []
        for streams in [int(s) for s in args.streams.split(",")]:
            trials: dict[str, list[dict]] = {name: [] for _, _, name in variants}
            order = variants
            for _ in tqdm(range(args.rounds), desc=f"{streams} streams", unit="round"):
                for side, api, name in order:
                    trials[name].append(trial(side, streams, args.tokens, api))
                order = order[::-1]
            summary = summarize(trials, [name for _, _, name in variants])
            points.append({"streams": streams, "trials": trials, "summary": summary})
            for _, _, name in variants:
                s = summary[name]
                print(
                    f"{streams:4d} streams {name}: router {s['router_us_per_token']:6.1f} us/token  decode "
                    f"{s['decode_us_per_token']:6.1f} us/token "
                    f"({s['decode_engine_thread_us_per_token']:.1f} on its engine thread, "
                    f"{s['decode_serving_us_per_token']:.1f} outside the engine call)  "
                    f"{s['token_rate']:7.0f} tokens/s  step "
                    f"{s['step_ms_mean']:.2f} ms  gap p50 {s['gap_ms_p50']:.2f} p99 {s['gap_ms_p99']:.2f} ms  "
                    f"router kernel {s['router_kernel_us_per_token']:.1f} us/token, delay per token p50 "
                    f"{s['relay_ms_p50']:.2f} p99 {s['relay_ms_p99']:.2f} ms",
                    flush=True,
                )
            if "head_over_base" in summary:
                r = summary["head_over_base"]
                print(
                    f"{streams:4d} streams head/base: router CPU/token {r['router_us_per_token']:.2f}x  decode "
                    f"CPU/token {r['decode_us_per_token']:.2f}x (outside the engine call "
                    f"{r['decode_serving_us_per_token']:.2f}x)  tokens/s {r['token_rate']:.2f}x",
                    flush=True,
                )
            if "http_over_grpc" in summary:
                r = summary["http_over_grpc"]
                print(
                    f"{streams:4d} streams head SSE/gRPC: router CPU/token {r['router_us_per_token']:.2f}x  "
                    f"tokens/s {r['token_rate']:.2f}x  gap p99 {r['gap_ms_p99']:.2f}x",
                    flush=True,
                )
    finally:
        for side in sides:
            stop_side(side)
    results = {
        "what": "serving-path CPU per streamed token, measured on this CPU, engines emulated at H100 timings",
        "profile": os.path.abspath(args.profile),
        "sides": [name for _, _, name in variants],
        "checkouts": {s.name: s.checkout for s in sides},
        "commits": {s.name: _commit(s.checkout) for s in sides},
        "emulated_engine_us_per_token": emulated_engine_us_per_token(),
        "routers": args.routers,
        "tokens_per_stream": args.tokens,
        "stream_interval": args.stream_interval,
        "cores": os.cpu_count(),
        "points": points,
    }
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "overhead.png"))
    print(f"wrote {args.out}/overhead.json and overhead.png")
    return 0


def _commit(checkout: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
