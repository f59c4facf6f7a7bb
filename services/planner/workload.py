"""Workload traces: the request stream that the benchmark replays and the planner simulates.

A trace is JSONL, one request per line, in arrival order:

    {"arrival_s": 0.31, "prompt_tokens": 812, "output_tokens": 156}

with optional "prompt" (text to send instead of synthetic tokens) and "request_id". Arrival times
are seconds from the start of the run.

Synthetic traces combine an arrival process (Poisson, or Gamma for bursty traffic) with a length
distribution per workload. Lengths are log-normal, clipped; the parameters below approximate the
public datasets DistServe (OSDI'24) evaluates on. They are assumptions, not fits done here (no
dataset is at hand offline): each entry says where its numbers come from. `scale` shrinks every
length, so that a tiny CPU model sees the same shape of traffic with fewer tokens.

Everything is deterministic for a seed. Arrivals and lengths use separate random streams, so two
traces of the same seed at different rates have the same requests, only compressed in time: this
is what the planner's rate search relies on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prompt: str | None = None
    request_id: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def read_trace(path: str) -> list[TraceRequest]:
    requests = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                raw = json.loads(line)
                request = TraceRequest(
                    arrival_s=float(raw["arrival_s"]),
                    prompt_tokens=int(raw["prompt_tokens"]),
                    output_tokens=int(raw["output_tokens"]),
                    prompt=raw.get("prompt"),
                    request_id=raw.get("request_id"),
                )
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
            except KeyError as e:
                raise ValueError(f"{path}:{line_no}: missing field {e}") from None
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: {e}") from None
            if request.prompt_tokens < 1 or request.output_tokens < 1 or request.arrival_s < 0:
                raise ValueError(f"{path}:{line_no}: prompt_tokens and output_tokens must be >= 1 and arrival_s >= 0")
            requests.append(request)
    requests.sort(key=lambda r: r.arrival_s)
    return requests


def write_trace(path: str, requests: list[TraceRequest]) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r.to_json()) + "\n")


# ---- arrival processes ------------------------------------------------------------------------


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process of `rate` requests/s (exponential inter-arrival gaps)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.cumsum(gaps).tolist()


def gamma_arrivals(rate: float, cv: float, n: int, seed: int = 0) -> list[float]:
    """Arrivals with Gamma-distributed gaps: mean 1/rate, coefficient of variation `cv`.

    cv = 1 is Poisson; cv > 1 is burstier (clumps of requests, then quiet), cv < 1 more regular.
    Gamma shape k = 1/cv^2, scale = 1/(rate*k)."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be > 0, got rate={rate}, cv={cv}")
    shape = 1.0 / (cv * cv)
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), n)
    return np.cumsum(gaps).tolist()


# ---- length distributions ---------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormalLengths:
    """Token counts drawn log-normally with the given mean (of the unclipped distribution) and
    log-space sigma, rounded and clipped to [min_tokens, max_tokens]."""

    mean: float
    sigma: float
    min_tokens: int
    max_tokens: int

    def sample(self, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
        mu = math.log(self.mean * scale) - self.sigma**2 / 2  # so that E[X] = mean * scale
        lo = max(1, round(self.min_tokens * scale))
        hi = max(lo, round(self.max_tokens * scale))
        values = np.rint(rng.lognormal(mu, self.sigma, n))
        return np.clip(values, lo, hi).astype(int)


@dataclass(frozen=True)
class WorkloadLengths:
    name: str
    prompt: LogNormalLengths
    output: LogNormalLengths
    source: str = field(default="", compare=False)


WORKLOADS: dict[str, WorkloadLengths] = {
    # Chatbot. ShareGPT conversations as reported by the vLLM paper (SOSP'23, Fig. 11: mean prompt
    # ~161, mean output ~338 tokens), with long heavy tails; DistServe's chatbot experiments use
    # ShareGPT on OPT models with a 2048-token context, hence the caps.
    "chat": WorkloadLengths(
        "chat",
        prompt=LogNormalLengths(mean=161, sigma=1.0, min_tokens=4, max_tokens=1536),
        output=LogNormalLengths(mean=338, sigma=0.9, min_tokens=4, max_tokens=1024),
        source="ShareGPT-like (vLLM paper means 161/338, log-normal tails assumed)",
    ),
    # Code completion. HumanEval: 164 function signatures + docstrings, prompts of roughly 50-400
    # tokens (~150 mean), short completions (the canonical solutions are ~60-200 tokens). Narrow
    # spread: the dataset is homogeneous.
    "code": WorkloadLengths(
        "code",
        prompt=LogNormalLengths(mean=150, sigma=0.45, min_tokens=32, max_tokens=600),
        output=LogNormalLengths(mean=100, sigma=0.6, min_tokens=8, max_tokens=512),
        source="HumanEval-like (prompt ~150, completion ~100 tokens assumed)",
    ),
    # Summarization. LongBench summarization tasks (GovReport, QMSum, MultiNews) have documents of
    # several thousand tokens; DistServe truncates to the model's 2048-token window, so prompts
    # crowd towards that cap. Summaries are a few hundred tokens at most.
    "summarization": WorkloadLengths(
        "summarization",
        prompt=LogNormalLengths(mean=1700, sigma=0.35, min_tokens=512, max_tokens=1900),
        output=LogNormalLengths(mean=120, sigma=0.5, min_tokens=16, max_tokens=400),
        source="LongBench-like (long prompts near a 2k window, ~120-token summaries assumed)",
    ),
}


def sample_lengths(workload: str, n: int, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens, output_tokens) arrays of `n` requests of a named workload."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    spec = WORKLOADS[workload]
    # Separate streams (and apart from the arrivals' [seed, 0]): the first k requests of a trace
    # of n are the same for every n >= k.
    prompts = spec.prompt.sample(np.random.default_rng([seed, 1]), n, scale)
    outputs = spec.output.sample(np.random.default_rng([seed, 2]), n, scale)
    return prompts, outputs


def make_trace(
    workload: str,
    rate: float,
    n: int,
    seed: int = 0,
    *,
    cv: float | None = None,
    scale: float = 1.0,
    max_model_len: int | None = None,
) -> list[TraceRequest]:
    """A synthetic trace: `n` requests of `workload` arriving at `rate` req/s.

    cv None (or 1) gives Poisson arrivals; another cv gives Gamma arrivals of that burstiness.
    max_model_len, when given, trims outputs so that prompt + output fits the model's window."""
    arrival_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
    if cv is None or cv == 1.0:
        arrivals = poisson_arrivals(rate, n, arrival_seed)
    else:
        arrivals = gamma_arrivals(rate, cv, n, arrival_seed)
    prompts, outputs = sample_lengths(workload, n, seed, scale)
    if max_model_len is not None:
        prompts = np.minimum(prompts, max_model_len - 1)
        outputs = np.maximum(1, np.minimum(outputs, max_model_len - prompts))
    return [
        TraceRequest(arrival_s=float(t), prompt_tokens=int(p), output_tokens=int(o), request_id=f"{workload}-{i}")
        for i, (t, p, o) in enumerate(zip(arrivals, prompts, outputs))
    ]


def rescale_rate(requests: list[TraceRequest], rate: float, from_rate: float | None = None) -> list[TraceRequest]:
    """The same requests with arrival times compressed or stretched from `from_rate` (default: the
    trace's measured average, n / last arrival) to `rate` req/s.

    Keeps the shape of the arrival process (Poisson stays Poisson at the new rate)."""
    if not requests:
        return []
    if from_rate is None:
        last = requests[-1].arrival_s
        from_rate = len(requests) / last if last > 0 else rate
    factor = from_rate / rate
    return [
        TraceRequest(r.arrival_s * factor, r.prompt_tokens, r.output_tokens, r.prompt, r.request_id) for r in requests
    ]
