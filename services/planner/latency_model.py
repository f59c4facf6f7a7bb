"""The latency model of one instance, fitted by least squares (DistServe's simulator form).

    prefill_time(batch) = a + b * sum(len_i) + c * sum(len_i^2)
        a: fixed cost of a forward pass (kernel launches, weight reads at small batches)
        b: per-token cost of the matmuls (linear in tokens)
        c: attention's quadratic cost (every token attends to every earlier one)
    decode_step_time(batch) = a' + b' * sum(context_i) + c' * batch_size
        a': weight reads (the same for any batch: decode is memory-bound)
        b': KV reads (every step reads each sequence's whole context)
        c': per-sequence compute and bookkeeping

A `LatencyProfile` is one instance configuration (model, device, tensor and pipeline degree): the
two fitted models, the KV memory the instance has, the prefill token budget L_m, and the fixed
overheads of the serving system around the engine. It is what `plan profile` writes and what the
simulator reads, whether it was measured or derived from a GPU's datasheet (analytic.py).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

PROFILE_SCHEMA = "pdserve.profile/v1"


@dataclass(frozen=True)
class PrefillLatency:
    a: float
    b: float
    c: float

    def batch_time(self, sum_len: float, sum_len_sq: float) -> float:
        return self.a + self.b * sum_len + self.c * sum_len_sq

    def time(self, lengths) -> float:
        return self.batch_time(sum(lengths), sum(n * n for n in lengths))


@dataclass(frozen=True)
class DecodeLatency:
    a: float
    b: float
    c: float

    def step_time(self, batch_size: int, sum_context: float) -> float:
        return self.a + self.b * sum_context + self.c * batch_size


def nonneg_lstsq(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least squares with coefficients >= 0 (a negative time coefficient is noise, not physics).

    With three unknowns, trying every subset of columns is exact and cheaper than an NNLS solver."""
    if weights is not None:
        x, y = x * weights[:, None], y * weights
    scale = np.maximum(np.abs(x).max(axis=0), 1e-300)  # columns span ~10 orders of magnitude
    xs = x / scale
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y * y))
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            coef, *_ = np.linalg.lstsq(xs[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((xs[:, cols] @ coef - y) ** 2))
            if err < best_err - 1e-18:
                best = np.zeros(x.shape[1])
                best[list(cols)] = coef
                best_err = err
    return best / scale


def _fit_quality(x: np.ndarray, y: np.ndarray, coef: np.ndarray) -> dict:
    pred = x @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1e-300
    return {"r2": 1 - ss_res / ss_tot, "mean_abs_rel_error": float(np.mean(np.abs(pred - y) / y)), "samples": len(y)}


def fit_prefill(samples: list[tuple[list[int], float]], relative: bool = True) -> tuple[PrefillLatency, dict]:
    """Fits (a, b, c) to (lengths of a batch, seconds) samples. `relative` weights each sample by
    1/time, so small batches (the ones that set a) count as much as large ones."""
    x = np.array([[1.0, sum(ls), sum(n * n for n in ls)] for ls, _ in samples])
    y = np.array([t for _, t in samples], dtype=float)
    coef = nonneg_lstsq(x, y, 1.0 / y if relative else None)
    return PrefillLatency(*map(float, coef)), _fit_quality(x, y, coef)


def fit_decode(samples: list[tuple[int, int, float]], relative: bool = True) -> tuple[DecodeLatency, dict]:
    """Fits (a', b', c') to (batch size, total context, seconds) samples."""
    x = np.array([[1.0, ctx, bs] for bs, ctx, _ in samples], dtype=float)
    y = np.array([t for _, _, t in samples], dtype=float)
    coef = nonneg_lstsq(x, y, 1.0 / y if relative else None)
    return DecodeLatency(*map(float, coef)), _fit_quality(x, y, coef)


def critical_batch_tokens(
    prefill: PrefillLatency, typical_len: int, tolerance: float = 0.1, lo: int = 128, hi: int = 1 << 16
) -> int:
    """L_m: the batch size in tokens past which batching more prompts stops paying.

    For a batch of n prompts of length l, time per token is a/(n*l) + b + c*l: batching only
    amortises a. L_m is where that amortised part falls to `tolerance` of the rest; a bigger
    budget would lengthen every batch (and TTFT) for at most that much more throughput."""
    per_token = prefill.b + prefill.c * typical_len
    if per_token <= 0:
        return hi
    tokens = prefill.a / (tolerance * per_token)
    tokens = max(tokens, typical_len, lo)
    return int(min(hi, 128 * math.ceil(tokens / 128)))


@dataclass
class Overheads:
    """Time the serving system adds around the engine, all in seconds (0 = not modelled)."""

    dispatch_s: float = 0.0  # request reaches the router -> it is in a prefill worker's queue
    first_token_s: float = 0.0  # prefill batch done -> first token reaches the client
    handoff_s: float = 0.0  # prefill batch done -> request is in a decode worker's queue
    prefill_batch_s: float = 0.0  # added to every prefill batch (batcher, RPC, sampling)
    decode_step_s: float = 0.0  # added to every decode step (scheduler, token streaming)


@dataclass
class TransferSpec:
    """KV transfer time = fixed_s + bytes / bytes_per_s (None = instantaneous)."""

    fixed_s: float = 0.0
    bytes_per_s: float | None = None

    def seconds(self, num_bytes: float) -> float:
        return self.fixed_s + (num_bytes / self.bytes_per_s if self.bytes_per_s else 0.0)


@dataclass
class LatencyProfile:
    prefill: PrefillLatency
    decode: DecodeLatency
    kv_bytes_per_token: int  # all layers, whole model
    kv_capacity_tokens: int  # KV slots of one instance (all its GPUs)
    block_size: int = 16
    max_batched_tokens: int = 4096  # prefill token budget L_m
    max_num_seqs: int = 256  # decode batch limit
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    source: str = "measured"  # "measured" | "analytic"
    model: str = ""
    device: str = ""
    dtype: str = ""
    overheads: Overheads = field(default_factory=Overheads)
    transfer: TransferSpec = field(default_factory=TransferSpec)
    fit: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    def to_json(self) -> dict:
        d = asdict(self)
        return {"schema": PROFILE_SCHEMA, **d}

    @classmethod
    def from_json(cls, d: dict) -> LatencyProfile:
        d = dict(d)
        schema = d.pop("schema", PROFILE_SCHEMA)
        if schema != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {schema!r} is not {PROFILE_SCHEMA!r}")
        d["prefill"] = PrefillLatency(**d["prefill"])
        d["decode"] = DecodeLatency(**d["decode"])
        d["overheads"] = Overheads(**d.get("overheads", {}))
        d["transfer"] = TransferSpec(**d.get("transfer", {}))
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> LatencyProfile:
        with open(path) as f:
            try:
                return cls.from_json(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
            except (KeyError, TypeError) as e:  # a missing or unexpected field
                raise ValueError(
                    f"{path}: not a latency profile ({type(e).__name__}: {e}); write one with `pdserve plan profile`"
                ) from None
