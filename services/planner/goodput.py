"""Goodput: the highest request rate whose simulated SLO attainment stays at or above a target.

Attainment falls as the rate grows (more queueing, bigger batches), so the highest passing rate is
found by doubling (or quartering) from a guess until the rate is bracketed, then bisecting. Every
probe replays the same requests (a prefix of one trace) with arrival times compressed to the
probed rate (common random numbers), so the attainment curve is close to monotone and the
bisection does not chase sampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from services.common.latency_profile import LatencyProfile
from services.planner.workload import TraceRequest, rescale_rate

from .simulator import SimConfig, Slo, simulate


def max_rate_meeting(
    attainment_at: Callable[[float], float],
    target: float,
    guess: float = 1.0,
    rel_tol: float = 0.02,
    min_rate: float | None = None,
    max_rate: float = 1e7,
) -> float:
    """Highest rate r with attainment_at(r) >= target (to within rel_tol), for attainment that
    does not increase with rate. 0 when even `min_rate` (default guess / 1000) fails."""
    if guess <= 0:
        raise ValueError("guess must be > 0")
    min_rate = guess / 1000 if min_rate is None else min_rate
    lo, hi = 0.0, guess
    if attainment_at(guess) >= target:
        lo, hi = guess, guess * 2
        while attainment_at(hi) >= target:
            lo, hi = hi, hi * 2
            if hi > max_rate:
                return math.inf
    else:
        # Walk down until a rate passes, so the bisection below starts from a bracket.
        while True:
            hi_try = hi / 4
            if hi_try < min_rate:
                # Nothing from min_rate up passes (or the pass region is below min_rate).
                if attainment_at(min_rate) < target:
                    return 0.0
                return bisect_rate(attainment_at, target, min_rate, hi, rel_tol)
            if attainment_at(hi_try) >= target:
                lo = hi_try
                break
            hi = hi_try
    return bisect_rate(attainment_at, target, lo, hi, rel_tol)


def bisect_rate(attainment_at, target: float, lo: float, hi: float, rel_tol: float) -> float:
    """Narrows [lo (passes), hi (fails)] to rel_tol; returns the passing end."""
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if attainment_at(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


TraceAt = Callable[[float], list[TraceRequest]]  # rate -> the trace to replay at that rate


def fixed_trace(base_trace: list[TraceRequest], base_rate: float = 1.0) -> TraceAt:
    """The same requests at every rate, arrival times compressed to the probed rate."""
    return lambda rate: rescale_rate(base_trace, rate, from_rate=base_rate)


def trace_attainment(config: SimConfig, trace_at: TraceAt, slo: Slo, target: float) -> Callable[[float], float]:
    """attainment(rate) of `config` on the trace `trace_at(rate)`; 0 when the simulated cluster
    does not keep up with the rate (SimResult.overloaded), which a finite trace can hide."""

    def attainment_at(rate: float) -> float:
        result = simulate(config, trace_at(rate), slo, stop_below=target)
        return 0.0 if result.overloaded else result.attainment

    return attainment_at


def prefill_goodput(
    profile: LatencyProfile, trace_at: TraceAt, slo: Slo, target: float, rel_tol: float = 0.02, **config
) -> float:
    """Goodput of one prefill instance alone on the TTFT SLO (DistServe's simu_prefill)."""
    cfg = SimConfig(prefill_profile=profile, num_prefill=1, num_decode=0, **config)
    fn = trace_attainment(cfg, trace_at, Slo(ttft_s=slo.ttft_s), target)
    return max_rate_meeting(fn, target, guess=prefill_capacity(profile, trace_at(1.0)), rel_tol=rel_tol)


def decode_goodput(
    profile: LatencyProfile, trace_at: TraceAt, slo: Slo, target: float, rel_tol: float = 0.02, **config
) -> float:
    """Goodput of one decode instance alone on the TPOT SLO (DistServe's simu_decode): requests
    arrive with their first token and KV ready."""
    cfg = SimConfig(decode_profile=profile, num_prefill=0, num_decode=1, **config)
    fn = trace_attainment(cfg, trace_at, Slo(tpot_s=slo.tpot_s), target)
    return max_rate_meeting(fn, target, guess=decode_capacity(profile, trace_at(1.0)), rel_tol=rel_tol)


def prefill_capacity(p: LatencyProfile, trace) -> float:
    """A rough request rate the instance saturates at: a starting point for the doubling."""
    mean_len = sum(r.prompt_tokens for r in trace) / len(trace)
    per_request = (
        p.prefill.b * mean_len + p.prefill.c * mean_len**2 + p.prefill.a / max(1, p.max_batched_tokens // mean_len)
    )
    return max(1e-3, p.pipeline_parallel / max(per_request, 1e-9))


def decode_capacity(p: LatencyProfile, trace) -> float:
    n = len(trace)
    mean_out = sum(r.output_tokens for r in trace) / n
    mean_ctx = sum(r.prompt_tokens + r.output_tokens / 2 for r in trace) / n
    batch = max(1.0, min(p.max_num_seqs, p.kv_capacity_tokens / max(mean_ctx, 1) / p.pipeline_parallel))
    step = p.decode.step_time(batch, batch * mean_ctx)
    return max(1e-3, p.pipeline_parallel * batch / (max(mean_out, 1) * step))
