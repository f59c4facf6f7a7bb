"""Fitting the latency model of services/common/latency_profile.py to measured steps, by least
squares with non-negative coefficients, and choosing the prefill token budget L_m from the fit.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from services.common.latency_profile import DecodeLatency, PrefillLatency


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
