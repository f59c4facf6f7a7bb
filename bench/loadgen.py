"""Open-loop load through the router's public gRPC API, measured at the client.

Requests are sent at their trace arrival times whether or not earlier ones finished (open loop:
a slow server does not slow the offered load down, as with real users). Each request asks for
exactly its trace output length (ignore_eos), so every configuration does the same work. TTFT and
TPOT are measured here, at the client, as users experience them.

    python -m bench.loadgen --router 127.0.0.1:7000 --workload chat --rate 2 --n 100 --scale 0.25
    python -m bench.loadgen --router 127.0.0.1:7000 --trace my_trace.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import grpc
from tqdm import tqdm

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.planner.workload import TraceRequest, make_trace, read_trace


@dataclass
class RequestResult:
    request_id: str
    prompt_tokens: int
    output_tokens: int  # asked for
    tokens: int = 0  # received
    ttft: float = float("nan")
    tpot: float = 0.0
    e2e: float = float("nan")
    error: str = ""
    # how long after its scheduled arrival the request went out: a load generator that falls
    # behind sends fewer requests a second than the trace says, and the cluster looks better
    sent_late: float = 0.0
    # the router's own account (Timing, on the last message): TTFT from its arrival, and the
    # worker's queue and prefill inside it
    router_ttft: float = float("nan")
    queue: float = float("nan")
    prefill: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.error and self.tokens > 0


def synthetic_prompt(request: TraceRequest, index: int, vocab_size: int, seed: int) -> list[int]:
    """Token ids for a trace request that has only a length (ids above the special tokens). The same
    (seed, index) gives the same ids: a bench that replays traces on one cluster gives each replay its
    own seed, or its prompts hit the prefix caches the earlier replays filled."""
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(3, vocab_size) for _ in range(request.prompt_tokens)]


async def _one(stub, request: TraceRequest, index: int, vocab_size: int, seed: int, timeout: float) -> RequestResult:
    result = RequestResult(request.request_id or str(index), request.prompt_tokens, request.output_tokens)
    message = router_pb2.GenerateRequest(
        request_id=result.request_id,
        sampling=common_pb2.SamplingParams(max_tokens=request.output_tokens, temperature=0, ignore_eos=True),
    )
    if request.prompt:
        message.prompt = request.prompt
    else:
        message.token_ids.extend(synthetic_prompt(request, index, vocab_size, seed))
    sent = time.perf_counter()
    first = last = None
    try:
        async for response in stub.Generate(message, timeout=timeout):
            now = time.perf_counter()
            if response.token_ids:
                if first is None:
                    first = now
                last = now
                result.tokens += len(response.token_ids)
            if response.HasField("timing"):
                t = response.timing
                result.router_ttft, result.queue, result.prefill = t.ttft_seconds, t.queue_seconds, t.prefill_seconds
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    if first is not None:
        assert last is not None  # set together with first
        result.ttft = first - sent
        result.e2e = last - sent
        result.tpot = (last - first) / (result.tokens - 1) if result.tokens > 1 else 0.0
    return result


async def run_trace_async(
    router: str,
    trace: list[TraceRequest],
    vocab_size: int,
    seed: int = 0,
    timeout: float = 300.0,
    progress: bool = True,
    channels: int = 4,
) -> list[RequestResult]:
    pool = [grpc.aio.insecure_channel(router) for _ in range(channels)]
    stubs = [router_pb2_grpc.RouterStub(c) for c in pool]
    bar = tqdm(total=len(trace), desc="requests", unit="req", leave=False, disable=not progress)
    start = time.perf_counter()

    async def scheduled(i: int, request: TraceRequest) -> RequestResult:
        delay = start + request.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        late = time.perf_counter() - (start + request.arrival_s)
        result = await _one(stubs[i % len(stubs)], request, i, vocab_size, seed, timeout)
        result.sent_late = late
        bar.update(1)
        return result

    try:
        return list(await asyncio.gather(*(scheduled(i, r) for i, r in enumerate(trace))))
    finally:
        bar.close()
        for c in pool:
            await c.close()


def run_trace(router: str, trace: list[TraceRequest], vocab_size: int, **kwargs) -> list[RequestResult]:
    return asyncio.run(run_trace_async(router, trace, vocab_size, **kwargs))


def attainment(results: list[RequestResult], ttft_slo: float, tpot_slo: float) -> float:
    """Fraction of requests meeting both SLOs; failed requests count as misses."""
    if not results:
        return 0.0
    met = sum(1 for r in results if r.ok and r.ttft <= ttft_slo and r.tpot <= tpot_slo)
    return met / len(results)


def percentile(values: list[float], p: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[RequestResult], ttft_slo: float, tpot_slo: float) -> dict:
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "attainment": attainment(results, ttft_slo, tpot_slo),
        "ttft_attainment": sum(1 for r in ok if r.ttft <= ttft_slo) / max(1, len(results)),
        "tpot_attainment": sum(1 for r in ok if r.tpot <= tpot_slo) / max(1, len(results)),
        **{f"ttft_p{int(p * 100)}": percentile([r.ttft for r in ok], p) for p in (0.5, 0.9, 0.99)},
        **{f"tpot_p{int(p * 100)}": percentile([r.tpot for r in ok], p) for p in (0.5, 0.9, 0.99)},
        "ttft_mean": statistics.fmean([r.ttft for r in ok]) if ok else float("nan"),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router", default="127.0.0.1:7000")
    ap.add_argument("--trace", help="JSONL trace (arrival_s, prompt_tokens or prompt, output_tokens)")
    ap.add_argument("--workload", default="chat", help="chat, code or summarization (without --trace)")
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s (without --trace)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--cv", type=float, default=None, help="burstiness: gamma arrivals with this CV (1: Poisson)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply trace lengths (small models)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-slo", type=float, default=0.25)
    ap.add_argument("--tpot-slo", type=float, default=0.1)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    trace = (
        read_trace(args.trace)
        if args.trace
        else make_trace(args.workload, args.rate, args.n, args.seed, cv=args.cv, scale=args.scale)
    )
    results = run_trace(args.router, trace, args.vocab_size, seed=args.seed)
    summary = summarize(results, args.ttft_slo, args.tpot_slo)
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "requests": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
