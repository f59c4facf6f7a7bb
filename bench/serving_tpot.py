"""TPOT through the whole serving path against the engine's own, same model and device, one run.

    python -m bench.serving_tpot                       # CPU: the llama-serve test model, batch 64
    python -m bench.serving_tpot --emulate profiles/llama-3-8b-H100-80G-analytic.json --model llama
    python -m bench.serving_tpot --model llama-3-8b --device cuda:0         # bfloat16 on CUDA

Issue 16's GPU goal: at batch 64, TPOT through the router <= 1.10x the engine-only TPOT.
- Engine only: this process builds the engine a decode worker builds from the same worker flags
  (runtime/worker.py's engine_from_flags), prefills --batch prompts of --prompt-tokens and times
  --tokens decode steps of them all: seconds per step is the engine's TPOT at that batch.
- Serving: `pdserve up` on the same device (router, one prefill worker, one decode worker, one
  kvstore daemon; both workers with those flags, each logging its steps). --batch Generate streams
  of the same prompts and lengths open at once through the router. TPOT is timed at the client over
  the window in which every stream was decoding, so at the full batch (serving_trial).
Rounds alternate (engine, serving, serving, engine, ...) so that both see the same machine. Reported:
medians and the median of per-round ratios, and where a difference arises: the decode worker's
engine call at the full batch (slowed by the serving path sharing its process and cores) and its
step-to-step time (plus its own work between steps), from its step log.

Where the steps run decides what the figure is:
- on a GPU (--device cuda:N): the issue's measurement; the engine-only engine, the prefill worker
  and the decode worker each hold the weights on that GPU (an 8B model: 3 x 16 GB);
- emulated (--emulate PROFILE): no model runs, a step sleeps its profile's time and the host waits
  as on a GPU: the serving path's cost at that GPU's step times, on this machine's CPU;
- on the CPU: the client, the router and both workers share this machine's cores with the
  engine's threads, which a GPU server's engine does not need: a figure of this machine.
A full-size spec (llama-3-8b) is saved once as a random-weight checkpoint in --dtype under
$PDSERVE_CACHE/models, since workers load folders (8B in bfloat16: 16 GB of disk).
Writes JSON and a PNG to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import tempfile
import time

import grpc
import torch
from tqdm import tqdm

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.common.enums import Role
from services.common.paths import cache_dir
from services.engine.config import BACKENDS, ModelConfig
from services.engine.engine import Engine
from services.launcher import Cluster, ClusterSpec
from services.runtime.step_log import read_step_log
from services.runtime.worker import engine_from_flags, worker_parser
from services.tiny_models import IN_MEMORY_ONLY, SPECS, build_model, built_once, get_model, spec_key

from .engine import _prompts, engine_trial
from .loadgen import percentile


def checkpoint_folder(model: str, dtype: str, device: str) -> str:
    """A folder as given, a test model's, or a full-size spec saved once with random weights."""
    if os.path.isdir(model):
        return model
    if model not in IN_MEMORY_ONLY:
        return get_model(model)
    folder = os.path.join(cache_dir(), "models", f"{spec_key(model)}-{dtype}")
    built_once(folder, lambda tmp: build_model(model, tmp, dtype=dtype, device=device))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the workers, other processes, load it on the same GPU
    return folder


def kv_cache_gb(folder: str, dtype: str, batch: int, context: int, block_size: int = 16) -> float:
    """Enough KV pool for `batch` sequences of `context` tokens, and for one of the model's
    longest (an engine takes no smaller pool), with room to spare."""
    config = ModelConfig.from_pretrained(folder)
    per_token = config.kv_elements_per_token * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    blocks = max(batch * (context // block_size + 2), config.max_model_len // block_size + 2)
    return round(1.5 * blocks * block_size * per_token / 2**30 + 0.05, 2)


async def _stream(stub, prompt: list[int], tokens: int) -> list[tuple[float, int]]:
    """One Generate stream: (arrival on the monotonic clock, tokens) of each message."""
    request = router_pb2.GenerateRequest(
        token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    )
    arrivals = []
    async for response in stub.Generate(request, timeout=600):
        arrivals.append((time.monotonic(), len(response.token_ids)))
    return arrivals


async def _streams(
    router: str, prompts: list[list[int]], tokens: int, pacer: list[int]
) -> list[list[tuple[float, int]]]:
    """The streams, after a request that only prefills (`pacer`, one token): it keeps the prefill
    worker busy while the streams arrive, so that they are prefilled together. (The first stream
    to arrive at an idle worker would otherwise be prefilled alone and decode alone meanwhile:
    on a CPU for longer than its whole output.)"""
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        pacing = asyncio.create_task(_stream(stub, pacer, 1))
        await asyncio.sleep(0.005)
        streams = await asyncio.gather(*(_stream(stub, p, tokens) for p in prompts))
        await pacing
        return streams


def second_token_arrival(arrivals: list[tuple[float, int]]) -> float:
    received = 0
    for t, n in arrivals:
        received += n
        if received >= 2:
            return t
    raise ValueError("a stream of one token")


def window_tpot(arrivals: list[tuple[float, int]], start: float, end: float) -> float:
    """Seconds per token of a stream's messages within [start, end], after the first of them."""
    inside = [(t, n) for t, n in arrivals if start <= t <= end]
    after_first = sum(n for _, n in inside[1:])
    return (inside[-1][0] - inside[0][0]) / after_first if after_first else float("nan")


def serving_trial(cluster: Cluster, prompts: list[list[int]], pacer: list[int], tokens: int, step_logs: str) -> dict:
    started = time.monotonic()
    streams = asyncio.run(_streams(cluster.info()["router"], prompts, tokens, pacer))
    received = [sum(n for _, n in arrivals) for arrivals in streams]
    if received != [tokens] * len(prompts):
        raise RuntimeError(f"streams received {received}, not {tokens} tokens each")
    steps = [
        step
        for name in sorted(os.listdir(step_logs))
        for step in read_step_log(os.path.join(step_logs, name))
        if step["t"] >= started
    ]
    return full_batch_window(streams, steps, len(prompts[0]))


def full_batch_window(streams: list[list[tuple[float, int]]], steps: list[dict], prompt_tokens: int) -> dict:
    """The streams' TPOT while all of them were decoding, and the decode worker's steps then (from
    the workers' step logs). Prefills and KV transfers end at different times, so the decode batch
    fills up over the first steps and empties over the last: the window runs from the last
    stream's first decoded token (its second: the prefill worker makes the first) to the first
    stream's last one. Client arrivals lag the steps by a relay, so the window's first and last
    steps may be a stream short: the worker's figures take the steps at the full batch."""
    batch = len(streams)
    start, end = max(second_token_arrival(a) for a in streams), min(a[-1][0] for a in streams)
    tpots = [window_tpot(arrivals, start, end) for arrivals in streams]
    window = [step for step in steps if step["kind"] == "decode" and start <= step["t"] <= end]
    full = [step for step in window if step["batch"] == batch]
    if len(full) < 8 or any(math.isnan(t) for t in tpots):
        raise RuntimeError(
            f"{len(full)} decode steps ran at the full batch of {batch} (largest: "
            f"{max((step['batch'] for step in window), default=0)}; every stream decoding for {end - start:.2f} s): "
            f"prefills ended too far apart for the streams' tokens (raise --tokens)"
        )
    return {
        "tpot_s": statistics.median(tpots),
        "tpot_s_p90": percentile(tpots, 0.9),
        "window_steps": len(window),
        "full_batch_steps": len(full),
        # the decode worker's engine call at the full batch, and the time from one such step's
        # start to the next's (the call and the worker's own work between steps)
        "worker_step_s": statistics.median(step["seconds"] for step in full),
        "worker_period_s": statistics.median(
            b["t"] - a["t"] for a, b in zip(window, window[1:]) if a["batch"] == b["batch"] == batch
        ),
        # how the streams' prompts were prefilled: how many in each prefill step that had any
        "stream_prefill_batches": [
            n
            for step in steps
            if step["kind"] == "prefill" and (n := sum(1 for length in step["lengths"] if length == prompt_tokens))
        ],
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    x = list(range(1, len(rounds) + 1))
    fig, (ms, ratio) = plt.subplots(1, 2, figsize=(11, 4))
    series = [
        ("engine only", "engine_tpot_s", "o-"),
        ("decode worker: engine call", "worker_step_s", "^-"),
        ("decode worker: step to step", "worker_period_s", "v-"),
        ("through the router: client TPOT", "tpot_s", "s-"),
    ]
    for i, (label, key, style) in enumerate(series):
        ms.plot(x, [1e3 * r[key] for r in rounds], style, color=f"C{i}", label=label)
        if i:
            ratio.plot(x, [r[key] / r["engine_tpot_s"] for r in rounds], style, color=f"C{i}", label=label)
    top = 1e3 * max(r[key] for r in rounds for _, key, _ in series)
    ms.set(xlabel="round", ylabel="ms per output token", ylim=(0, 1.35 * top), xticks=x, title="per token")
    ms.legend(fontsize=8, loc="lower right")
    ratio.axhline(1.10, color="gray", linestyle="--", label="issue 16's goal on a GPU (1.10x)")
    ratio.set(xlabel="round", ylabel="over the engine alone", xticks=x, title="against the engine alone, each round")
    ratio.legend(fontsize=8, loc="center right")
    fig.suptitle(
        f"{result['device_name']}\nbatch {result['batch']}: through the router {result['serving_over_engine']:.2f}x "
        f"the engine alone (median)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def device_name(args, dtype: str, threads: int) -> str:
    """What ran the steps, for the printout and the plot's title."""
    cores = f"{len(os.sched_getaffinity(0))} CPU cores shared by all"
    if args.emulate:
        return f"engines emulated at {os.path.basename(args.emulate)}, {cores}"
    if args.device.startswith("cuda"):
        return f"{args.model} {dtype} on {torch.cuda.get_device_name(args.device)}"
    return f"{args.model} {dtype} on the CPU, {threads} torch thread{'s' if threads > 1 else ''} per worker, {cores}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-serve", help=f"a checkpoint folder or a spec: {', '.join(SPECS)}")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (both workers and the engine-only run on it)")
    ap.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--backend", choices=list(BACKENDS), default="auto")
    ap.add_argument("--batch", type=int, default=64, help="concurrent requests, the decode batch")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="engine and serving trials each")
    ap.add_argument("--kv-cache-gb", type=float, default=0.0, help="each engine's pool (0: what the batch needs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker and engine (0: cores / 2)")
    ap.add_argument(
        "--emulate",
        default="",
        metavar="PROFILE",
        help="every engine, the engine-only one too, emulated at this latency profile's timings (no model runs: "
        "a step sleeps its time, the host waiting as on a GPU); --model then gives only the vocabulary",
    )
    ap.add_argument("--out", default="results/serving-tpot")
    args = ap.parse_args(argv)
    for name in ("batch", "prompt_tokens", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tokens < 3:
        ap.error("--tokens must be at least 3 (a TPOT needs tokens after the first)")
    if args.emulate and args.device != "cpu":
        ap.error("--emulate runs no model: leave --device out")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // 2)
    began = time.monotonic()

    def phase(what: str) -> None:  # (a run cut short by a time limit still says how far it got)
        print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)

    folder = checkpoint_folder(args.model, dtype, args.device)
    phase(f"checkpoint {folder}")
    # (an emulated engine's pool is its profile's)
    kv_gb = args.kv_cache_gb or kv_cache_gb(folder, dtype, args.batch, args.prompt_tokens + args.tokens)
    if args.emulate:
        engine_flags = ["--device", "emulated", "--profile", os.path.abspath(args.emulate)]
    else:
        engine_flags = ["--device", args.device, "--dtype", dtype, "--backend", args.backend]
    worker_flags = ["--model", folder, "--kv-cache-gb", str(kv_gb), "--threads", str(threads), *engine_flags]

    engine_args = worker_parser(Role.DECODE, "", port=0, metrics_port=-1).parse_args(worker_flags)
    engine = engine_from_flags(engine_args, Role.DECODE)
    phase("engine-only engine built")
    vocab = engine.model_config.vocab_size
    budget = engine.config.max_num_batched_tokens
    if args.batch * args.prompt_tokens > budget:
        print(f"note: the {args.batch} prompts exceed one prefill batch ({budget} tokens): they are prefilled in turns")
    # The pacer fills a prefill batch alone, as far as the model's length allows: a stream that
    # reaches the prefill worker before its batch forms cannot join it.
    pacer_tokens = min(budget, engine.max_model_len - 2)

    def prompts_of_round(seed: int) -> tuple[list[list[int]], list[int]]:  # new each round: no cached prefix
        pacer = _prompts(1, pacer_tokens, vocab, seed + 1_000_000)[0]
        return _prompts(args.batch, args.prompt_tokens, vocab, seed), pacer

    meta = {
        "model": args.model,
        "dtype": dtype,
        "device": args.device,
        "emulated_profile": args.emulate,
        "device_name": device_name(args, dtype, threads),
        "backend": engine.backend.name if isinstance(engine, Engine) else "none (emulated)",
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
    }
    step_logs = tempfile.mkdtemp(prefix="pdserve-steps-")
    spec = ClusterSpec(
        model=folder,
        router_port=0,
        http_port=-1,
        kv_cache_gb=kv_gb,
        threads=threads,
        log_dir=args.out + "-logs",
        worker_args=[*engine_flags, "--step-log", os.path.join(step_logs, "{worker}.jsonl")],
    )
    cluster = Cluster(spec)
    rounds: list[dict] = []
    try:
        cluster.start(progress=lambda line: None)
        phase("cluster up")
        engine_trial(engine, args.batch, args.prompt_tokens, 4, seed=10_000)  # warm-ups: graphs, connections
        prompts, pacer = prompts_of_round(10_001)
        serving_trial(cluster, prompts, pacer, args.tokens, step_logs)
        phase("warmed up")
        for r in tqdm(range(args.rounds), desc="rounds (engine and serving)"):
            prompts, pacer = prompts_of_round(r)
            order = ("engine", "serving") if r % 2 == 0 else ("serving", "engine")
            row: dict = {}
            for kind in order:
                if kind == "engine":
                    row["engine_tpot_s"] = engine_trial(engine, args.batch, args.prompt_tokens, args.tokens, seed=r)[1]
                else:
                    row.update(serving_trial(cluster, prompts, pacer, args.tokens, step_logs))
            row["serving_over_engine"] = row["tpot_s"] / row["engine_tpot_s"]
            rounds.append(row)
            tqdm.write(
                f"round {r + 1}: engine {1e3 * row['engine_tpot_s']:.2f} ms, through the router "
                f"{1e3 * row['tpot_s']:.2f} ms ({row['serving_over_engine']:.2f}x)"
            )
            write_result(summarize(meta, rounds), args.out, plot_too=False)  # what a cut-short run leaves
    finally:
        cluster.stop()
        shutil.rmtree(step_logs, ignore_errors=True)

    result = summarize(meta, rounds)
    print(
        f"\n{result['device_name']}, batch {args.batch}, prompts of {args.prompt_tokens}, {args.tokens} tokens "
        f"each; medians of {args.rounds} rounds"
    )
    print(f"  engine only:                     {1e3 * result['engine_tpot_s']:7.2f} ms per step")
    print(
        f"  decode worker, its engine call:  {1e3 * result['worker_step_s']:7.2f} ms "
        f"({result['worker_step_over_engine']:.2f}x); step to step {1e3 * result['worker_period_s']:.2f} ms"
    )
    print(
        f"  through the router, client TPOT: {1e3 * result['tpot_s']:7.2f} ms "
        f"({result['serving_over_engine']:.2f}x the engine's; the goal on a GPU: <= 1.10x)"
    )
    write_result(result, args.out)
    print(f"wrote {args.out}.json and {args.out}.png")
    return result


def summarize(meta: dict, rounds: list[dict]) -> dict:
    """Medians over the rounds; the ratios are medians of each round's."""

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    return {
        **meta,
        "engine_tpot_s": median("engine_tpot_s"),
        "tpot_s": median("tpot_s"),
        "worker_step_s": median("worker_step_s"),
        "worker_period_s": median("worker_period_s"),
        "serving_over_engine": median("serving_over_engine"),
        "worker_step_over_engine": statistics.median(r["worker_step_s"] / r["engine_tpot_s"] for r in rounds),
        "rounds": rounds,
    }


def write_result(result: dict, out: str, plot_too: bool = True) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    if plot_too:
        plot(result, out + ".png")


if __name__ == "__main__":
    main()
