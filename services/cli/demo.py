"""`pdserve demo`: the whole system on one machine in about a minute.

Builds the embedded tiny model (random weights: the text is gibberish, the mechanics are real),
starts router + prefill + decode + two kvstore daemons (two emulated nodes, so KV crosses between
daemons over UCX), streams one request token by token, then a few concurrent ones, prints their
TTFT/TPOT and the KV bytes the daemons moved, streams a chat through the OpenAI-compatible HTTP API,
and shuts the cluster down.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc

from pdserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc, router_pb2, router_pb2_grpc
from services.common.commands import at_least
from services.launcher import Cluster, ClusterSpec
from services.tiny_models import DEFAULT_SERVED_NAME, model_dir_or_default

PROMPTS = [
    "Once upon a time there lived a little fox who loved numbers",
    "The prefill worker computes the key value cache of the prompt",
    "Decode workers stream one token per step for every request",
    "A router sends each request to the least loaded worker",
    "Goodput is the highest request rate that meets both latency goals",
]


def add_demo_arguments(ap) -> None:
    ap.add_argument("--model", default="", help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--max-tokens", type=at_least(1), default=24)
    ap.add_argument("--nodes", type=at_least(1), default=2)
    ap.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    ap.add_argument("--log-dir", default="results/demo-logs")


async def _stream(stub, prompt: str, max_tokens: int, show: bool):
    request = router_pb2.GenerateRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=7)
    )
    text, last = "", None
    async for response in stub.Generate(request):
        text += response.text
        if show:
            print(response.text, end="", flush=True)
        last = response
    return text, last


async def _run(router: str, max_tokens: int) -> None:
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        print("\n(the embedded model has random weights: its text is gibberish, the serving path is real)")
        print(f"> {PROMPTS[0]}\n", end="")
        _, last = await _stream(stub, PROMPTS[0], max_tokens, show=True)
        print(
            f"\n  [{last.finish_reason}] TTFT {last.timing.ttft_seconds * 1e3:.1f} ms, "
            f"TPOT {last.timing.tpot_seconds * 1e3:.1f} ms\n"
        )
        print(f"{len(PROMPTS) - 1} concurrent requests:")
        results = await asyncio.gather(*(_stream(stub, p, max_tokens, show=False) for p in PROMPTS[1:]))
        print(f"  {'TTFT ms':>8} {'TPOT ms':>8} {'tokens':>6}  text")
        for text, last in results:
            t = last.timing
            print(
                f"  {t.ttft_seconds * 1e3:8.1f} {t.tpot_seconds * 1e3:8.1f} {last.usage.completion_tokens:6d}  "
                f"{text[:60]!r}"
            )


async def _chat(http: str, model: str, max_tokens: int) -> None:
    """One chat streamed through the OpenAI-compatible HTTP API, as any OpenAI client would."""
    import aiohttp

    url = f"http://{http}/v1/chat/completions"
    messages = [{"role": "user", "content": "Tell me a story about a fox"}]
    print(f"\nchat through the OpenAI-compatible HTTP API ({url}, stream=true):")
    print(f"> {messages[0]['content']}")
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "seed": 7}
    body["stream_options"] = {"include_usage": True}
    started, first, usage = time.monotonic(), 0.0, {}
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                first = first or time.monotonic()
                print(choice["delta"].get("content") or "", end="", flush=True)
    print(
        f"\n  [{usage.get('completion_tokens')} tokens, prompt {usage.get('prompt_tokens')} tokens as the chat "
        f"template wrote it] TTFT {(first - started) * 1e3:.1f} ms at the client"
    )


def _kv_bytes(info: dict) -> str:
    parts = []
    for svc in info["services"]:
        if svc["role"] == "kvstore":
            with grpc.insecure_channel(svc["grpc"]) as ch:
                s = kvstore_pb2_grpc.KvStoreStub(ch).Stats(kvstore_pb2.KvStoreStatsRequest(), timeout=5)
            parts.append(
                f"{svc['node']}: {s.bytes_ucx_sent} B sent / {s.bytes_ucx_received} B received over UCX, "
                f"{s.bytes_local} B copied locally"
            )
    return "\n  ".join(parts)


def demo(args) -> int:
    started = time.monotonic()
    print("building the embedded tiny model (cached after the first run)...", flush=True)
    model = model_dir_or_default(args.model)
    spec = ClusterSpec(
        model=model,
        served_model_name=args.model or DEFAULT_SERVED_NAME,
        mode=args.mode,
        nodes=args.nodes if args.mode == "disaggregated" else 1,
        router_port=0,
        log_dir=args.log_dir,
    )
    cluster = Cluster(spec)
    print(f"starting a {args.mode} cluster on {spec.nodes} emulated node(s) (logs in {args.log_dir}/):", flush=True)
    try:
        cluster.start()
        info = cluster.info()
        asyncio.run(_run(info["router"], args.max_tokens))
        asyncio.run(_chat(info["http"], spec.served_model_name, args.max_tokens))
        if args.mode == "disaggregated":
            print(f"\nKV moved by the kvstore daemons (never through gRPC):\n  {_kv_bytes(info)}")
    finally:
        print("\nstopping the cluster...", flush=True)
        codes = cluster.stop()
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        print(f"unclean exits: {bad}")
        return 1
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0
