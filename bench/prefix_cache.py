"""Prefix caching on workloads that repeat their prefixes: prefill tokens computed, TTFT and SLO
attainment without caching, with each worker's own cache, and with KV-aware dispatch on top.

    python -m bench.prefix_cache --mode cpu        # the tiny model on this CPU, lengths scaled down
    python -m bench.prefix_cache --mode emulated   # engines at an H100's timings (Llama-3-8B profile)

Workloads (seeded, the same requests for every configuration):
  multi-turn  conversations of 3-8 turns over a few shared system prompts; each turn's prompt is
              the conversation so far (system prompt, every earlier message and answer) and a new
              message. ShareGPT-like lengths: messages ~lognormal around 60 tokens, answers around
              200, system prompts 300-600 (times --scale). A conversation's next turn is sent when
              its answer has come, after a think time (exponential, mean --think-seconds);
              conversations start as a Poisson process at --rate.
  document    questions about a few long shared documents (1,500-3,000 tokens times --scale), each
              prompt a document and a question, short answers; Poisson arrivals at --rate.

Configurations, each on a fresh cluster (2 prefill workers and 1 decode worker, disaggregated, one
node):
  none         --no-prefix-caching on the workers, least-loaded dispatch
  worker       each prefill worker's own prefix cache only (--node-prefix-fetch never), least-loaded
  worker+kv    the same, KV-aware dispatch (router --prefill-policy kv-aware)
  all          the defaults: own caches, the node's prefix tier (the decode worker offers finished
               requests' blocks, which hold the answers; prefill workers fetch when it pays),
               KV-aware dispatch

Printed and written (JSON, PNG) per workload: prefill tokens computed (the prompt tokens sent less
those the workers found cached, from their metrics) and their ratio to `none`; TTFT p50/p90 and
the ratio of p90s; SLO attainment. Where each figure comes from is in the JSON ("source").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
import urllib.request
from dataclasses import asdict, dataclass

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.engine.config import ModelConfig
from services.launcher import Cluster, ClusterSpec
from services.tiny_models import get_model

from .loadgen import RequestResult, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = os.path.join(ROOT, "profiles", "llama-3-8b-H100-80G-analytic.json")
MODEL = "llama-serve"  # 4 layers, context 4096: the CPU runs it; emulated engines take its tokenizer and context
CONFIGS = {
    "none": (["--no-prefix-caching"], ["--prefill-policy", "least-loaded"]),
    "worker": (["--node-prefix-fetch", "never"], ["--prefill-policy", "least-loaded"]),
    "worker+kv": (["--node-prefix-fetch", "never"], ["--prefill-policy", "kv-aware"]),
    "all": ([], ["--prefill-policy", "kv-aware"]),
}


@dataclass
class Turn:
    message: list[int]  # appended to the conversation before this turn's request
    output_tokens: int


@dataclass
class Conversation:
    start_s: float
    turns: list[Turn]


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))


def multi_turn(n: int, rate: float, scale: float, vocab: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(3, vocab) for _ in range(max(1, int(k * scale)))]
    systems = [tokens(rng.randint(300, 600)) for _ in range(4)]
    conversations, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        turns = [Turn(rng.choice(systems) + tokens(_lognormal(rng, 60, 0.8, 8, 400)), 0)]
        for k in range(rng.randint(3, 8)):
            if k:
                turns.append(Turn(tokens(_lognormal(rng, 60, 0.8, 8, 400)), 0))
            turns[-1].output_tokens = max(2, int(_lognormal(rng, 200, 0.6, 16, 600) * scale))
        conversations.append(Conversation(t, turns))
    return conversations


def documents(n: int, rate: float, scale: float, vocab: int, seed: int) -> list[Conversation]:
    """One-turn 'conversations': a shared document and a question each."""
    rng = random.Random(seed + 1)
    tokens = lambda k: [rng.randrange(3, vocab) for _ in range(max(1, int(k * scale)))]
    docs = [tokens(rng.randint(1500, 3000)) for _ in range(4)]
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        question = tokens(rng.randint(20, 60))
        out.append(Conversation(t, [Turn(rng.choice(docs) + question, max(2, int(rng.randint(20, 80) * scale)))]))
    return out


async def _ask(stub, prompt: list[int], max_tokens: int, index: str) -> tuple[RequestResult, list[int]]:
    result = RequestResult(index, len(prompt), max_tokens)
    request = router_pb2.GenerateRequest(
        token_ids=prompt,
        request_id=index,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    sent = time.perf_counter()
    first = last = None
    answer: list[int] = []
    try:
        async for response in stub.Generate(request, timeout=600):
            now = time.perf_counter()
            if response.token_ids:
                first = first or now
                last = now
                answer.extend(response.token_ids)
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    result.tokens = len(answer)
    if first is not None and last is not None:
        result.ttft, result.e2e = first - sent, last - sent
        result.tpot = (last - first) / (len(answer) - 1) if len(answer) > 1 else 0.0
    return result, answer


async def run_conversations(
    router: str, conversations: list[Conversation], think_s: float, seed: int, max_model_len: int
):
    rng = random.Random(seed + 2)
    channel = grpc.aio.insecure_channel(router)
    stub = router_pb2_grpc.RouterStub(channel)
    total = sum(len(c.turns) for c in conversations)  # (some may end early: context)
    bar = tqdm(total=total, desc="turns", unit="req", leave=False)
    results: list[RequestResult] = []
    start = time.perf_counter()

    async def converse(i: int, conversation: Conversation) -> None:
        await asyncio.sleep(max(0.0, start + conversation.start_s - time.perf_counter()))
        history: list[int] = []
        for k, turn in enumerate(conversation.turns):
            if k:
                await asyncio.sleep(rng.expovariate(1 / think_s) if think_s > 0 else 0)
            history = history + turn.message
            if len(history) + turn.output_tokens > max_model_len:  # the conversation outgrew the context
                return
            result, answer = await _ask(stub, history, turn.output_tokens, f"c{i}-t{k}")
            results.append(result)
            bar.update(1)
            if result.error:
                return
            history = history + answer

    try:
        await asyncio.gather(*(converse(i, c) for i, c in enumerate(conversations)))
    finally:
        bar.close()
        await channel.close()
    return results


def _metric_by_tier(cluster: Cluster, role: str, name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for service in cluster.info()["services"]:
        if service["role"] != role:
            continue
        with urllib.request.urlopen(f"http://{service['metrics']}/metrics", timeout=5) as r:
            for family in text_string_to_metric_families(r.read().decode()):
                for s in family.samples:
                    if s.name == name:
                        totals[s.labels["tier"]] = totals.get(s.labels["tier"], 0.0) + s.value
    return totals


def cluster_spec(mode: str, config: str, model: str, log_dir: str) -> ClusterSpec:
    worker_args, router_args = CONFIGS[config]
    spec = ClusterSpec(
        model=model,
        mode="disaggregated",
        prefill=2,
        decode=1,
        nodes=1,
        log_dir=log_dir,
        router_port=0,
        worker_args=list(worker_args),
        router_args=list(router_args),
    )
    if mode == "emulated":
        spec.profiles = {"prefill": PROFILE, "decode": PROFILE}
    else:
        spec.threads = 1
        spec.kv_cache_gb = 0.05
    return spec


def run_config(mode: str, name: str, config: str, workload: list[Conversation], args, model: str) -> dict:
    spec = cluster_spec(mode, config, model, os.path.join(args.out, "logs", f"{mode}-{name}-{config}"))
    cluster = Cluster(spec)
    cluster.start(progress=lambda line: None)
    try:
        router = cluster.info()["router"]
        results = asyncio.run(
            run_conversations(
                router, workload, args.think_seconds, args.seed, ModelConfig.from_pretrained(model).max_model_len
            )
        )
        sent = sum(r.prompt_tokens for r in results if not r.error)
        by_tier = _metric_by_tier(cluster, "prefill", "pdserve_prefix_cache_hit_tokens_total")
        hits = sum(by_tier.values())
    finally:
        cluster.stop()
    summary = summarize(results, args.ttft_slo, args.tpot_slo)
    return {
        "config": config,
        "prompt_tokens_sent": sent,
        "prefill_tokens_hit": hits,
        "prefill_tokens_hit_by_tier": by_tier,
        "prefill_tokens_computed": sent - hits,
        **summary,
        "requests_detail": [asdict(r) for r in results],
    }


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(report["workloads"])
    sweep = report.get("goodput")
    cols = 3 if sweep else 2
    fig, axes = plt.subplots(len(workloads), cols, figsize=(5 * cols, 4 * len(workloads)), squeeze=False)
    colors = ["#888888", "#4a90d9", "#2a7a2a", "#d98c1a"]
    for w, name in enumerate(workloads):
        runs = report["workloads"][name]["configs"]
        labels = [r["config"] for r in runs]
        base = runs[0]["prefill_tokens_computed"] or 1
        ax = axes[w][0]
        ax.bar(labels, [r["prefill_tokens_computed"] / base for r in runs], color=colors[: len(runs)])
        ax.set_title(f"{name}: prefill tokens computed\n(fraction of {labels[0]})")
        ax.set_ylim(0, 1.05)
        ax = axes[w][1]
        x = range(len(runs))
        ax.bar([i - 0.2 for i in x], [r["ttft_p50"] for r in runs], 0.4, label="TTFT p50")
        ax.bar([i + 0.2 for i in x], [r["ttft_p90"] for r in runs], 0.4, label="TTFT p90")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("seconds")
        ax.set_title(f"{name}: TTFT at {report['workloads'][name]['rate']:g}/s")
        ax.legend()
        if sweep and w == 0:
            ax = axes[0][2]
            for color, (config, points) in zip(colors, sweep["attainment"].items()):
                ax.plot(list(map(float, points)), list(points.values()), "o-", color=color, label=config)
            ax.axhline(sweep["target"], color="red", linestyle=":", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("conversations started per second")
            ax.set_ylabel("SLO attainment")
            ax.set_title("multi-turn: attainment against rate")
            ax.legend()
        elif sweep:
            axes[w][2].axis("off")
    fig.suptitle(report["source"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def goodput_sweep(args, model: str, vocab: int, rates: list[float]) -> dict:
    """Multi-turn at each rate (conversations arriving over --arrival-seconds), every config: SLO
    attainment per rate, and goodput: the highest swept rate whose attainment meets --target."""
    attainment: dict[str, dict[str, float]] = {}
    for config in args.configs.split(","):
        attainment[config] = {}
        for rate in rates:
            n = max(1, round(rate * args.arrival_seconds))
            print(f"== goodput sweep: {config} at {rate:g} conversations/s ({n}) ==", flush=True)
            workload = multi_turn(n, rate, args.scale, vocab, args.seed)
            run = run_config(args.mode, f"sweep-{rate:g}", config, workload, args, model)
            attainment[config][f"{rate:g}"] = run["attainment"]
    goodput = {
        config: max((float(r) for r, a in points.items() if a >= args.target), default=0.0)
        for config, points in attainment.items()
    }
    print(f"\nmulti-turn goodput (conversations/s at attainment >= {args.target:g}; swept {rates}):")
    for config, points in attainment.items():
        print(f"{config:<12}" + "".join(f"{a:>8.2f}" for a in points.values()) + f"   goodput {goodput[config]:g}")
    return {"rates": rates, "target": args.target, "attainment": attainment, "goodput": goodput}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["cpu", "emulated"], default="cpu")
    ap.add_argument("--workloads", default="multi-turn,document")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--conversations", type=int, default=0, help="multi-turn conversations (0: per mode)")
    ap.add_argument("--questions", type=int, default=0, help="document questions (0: per mode)")
    ap.add_argument(
        "--rate", type=float, default=0.0, help="conversations (questions) started per second (0: per mode)"
    )
    ap.add_argument("--scale", type=float, default=0.0, help="lengths times this (0: per mode: cpu 0.25, emulated 1)")
    ap.add_argument("--think-seconds", type=float, default=1.0)
    ap.add_argument("--ttft-slo", type=float, default=0.0, help="0: per mode (cpu 1.0 s, emulated 0.25 s)")
    ap.add_argument("--tpot-slo", type=float, default=0.0, help="0: per mode (cpu 0.2 s, emulated 0.1 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--goodput-rates", default="", help="also sweep multi-turn over these conversation rates (comma list)"
    )
    ap.add_argument("--arrival-seconds", type=float, default=20.0, help="sweep: conversations arrive over this long")
    ap.add_argument("--target", type=float, default=0.9, help="sweep: the attainment goodput must meet")
    ap.add_argument("--out", default="results/prefix-cache")
    args = ap.parse_args(argv)
    cpu = args.mode == "cpu"
    args.scale = args.scale or (0.25 if cpu else 1.0)
    args.ttft_slo = args.ttft_slo or (1.0 if cpu else 0.25)
    args.tpot_slo = args.tpot_slo or (0.2 if cpu else 0.1)
    rate = args.rate or (0.5 if cpu else 2.0)
    model = get_model(MODEL)
    vocab = ModelConfig.from_pretrained(model).vocab_size
    os.makedirs(args.out, exist_ok=True)
    source = (
        f"measured on this CPU ({MODEL}, random weights)"
        if cpu
        else "emulated at H100 timings (Llama-3-8B analytic profile)"
    )
    make = {
        "multi-turn": lambda: multi_turn(args.conversations or (12 if cpu else 40), rate, args.scale, vocab, args.seed),
        "document": lambda: documents(args.questions or (40 if cpu else 120), rate * 4, args.scale, vocab, args.seed),
    }
    report: dict = {"mode": args.mode, "source": source, "args": vars(args), "workloads": {}}
    for name in args.workloads.split(","):
        workload = make[name]()
        runs = []
        for config in args.configs.split(","):
            print(f"== {name}: {config} ==", flush=True)
            runs.append(run_config(args.mode, name, config, workload, args, model))
        base = runs[0]
        for run in runs:
            run["computed_vs_first"] = run["prefill_tokens_computed"] / max(1, base["prefill_tokens_computed"])
            run["ttft_p90_gain_vs_first"] = base["ttft_p90"] / run["ttft_p90"] if run["ttft_p90"] else float("nan")
        report["workloads"][name] = {
            "requests": sum(len(c.turns) for c in workload),
            "rate": rate if name == "multi-turn" else rate * 4,
            "configs": runs,
        }
        print(f"\n{name} ({source}), ratios against {base['config']}:")
        print(
            f"{'config':<12}{'computed':>12}{'ratio':>8}{'TTFT p50':>10}{'p90':>8}{'p90 gain':>10}"
            f"{'attain':>8}{'errors':>8}"
        )
        for run in runs:
            print(
                f"{run['config']:<12}{run['prefill_tokens_computed']:>12.0f}{run['computed_vs_first']:>8.2f}"
                f"{run['ttft_p50']:>10.3f}{run['ttft_p90']:>8.3f}{run['ttft_p90_gain_vs_first']:>10.2f}"
                f"{run['attainment']:>8.2f}{run['errors']:>8}"
            )
    if args.goodput_rates:
        report["goodput"] = goodput_sweep(args, model, vocab, [float(r) for r in args.goodput_rates.split(",")])
    path = os.path.join(args.out, f"{args.mode}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, f"{args.mode}.png"))
    print(f"wrote {path} and its PNG")
    return report


if __name__ == "__main__":
    main()
