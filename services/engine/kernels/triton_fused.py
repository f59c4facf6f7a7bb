"""Fused elementwise kernels for CUDA decode and prefill.

A decode step of a large model at batch 1 is bound by reading the weights; what is left over is
the fixed cost of every kernel launched. In plain torch one layer launches dozens of kernels
(RMSNorm alone is seven) that each touch a few kilobytes (docs/engine.md counts them). These three
kernels replace most of them:

- add_rms_norm: residual += x; out = RMSNorm(residual)   (or plain RMSNorm)
- rope_and_write_kv: rotary embedding of q and k in place, and k/v written into their KV slots
- silu_and_mul: SiLU(gate) * up from the merged gate_up projection

Each reproduces the rounding of the `transformers` operation sequence it replaces (intermediate
results are rounded to the model dtype where torch rounds them), so half-precision results match
the reference as closely as the unfused torch ops do. They run under Triton's CPU interpreter in
the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    X, Residual, W, Out, stride_x, stride_r, stride_o, N, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(Residual + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Out + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of (x + residual) over the last dim; updates `residual` in place to x + residual."""
    rows, n = x.shape
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(n),
    )
    return out


@triton.jit
def _rotate(X, row_offset, heads, d, half_mask, c1, s1, c2, s2, HALF: tl.constexpr):
    """x*cos + rotate_half(x)*sin for the heads of one token, rounded as torch rounds it."""
    mask = heads[:, None] & half_mask[None, :]
    x1 = tl.load(X + row_offset[:, None] + d[None, :], mask=mask, other=0.0)
    x2 = tl.load(X + row_offset[:, None] + HALF + d[None, :], mask=mask, other=0.0)
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * c1[None, :]).to(dt).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s1[None, :]).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2[None, :]).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2[None, :]).to(dt).to(tl.float32)
    return (a1 + b1).to(dt), (a2 + b2).to(dt), mask


@triton.jit
def _rope_and_write_kv_kernel(
    Q,
    K,
    V,
    Cos,
    Sin,
    Positions,
    Slots,
    KCache,
    VCache,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_Q: tl.constexpr,
    NUM_KV: tl.constexpr,
    Q_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(Positions + t)
    slot = tl.load(Slots + t)
    d = tl.arange(0, HALF_PAD)
    half_mask = d < HALF
    dt = Q.dtype.element_ty
    # cos/sin are cast to the model dtype before use, as transformers does
    c1 = tl.load(Cos + pos * stride_cos + d, mask=half_mask, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(Cos + pos * stride_cos + HALF + d, mask=half_mask, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(Sin + pos * stride_cos + d, mask=half_mask, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(Sin + pos * stride_cos + HALF + d, mask=half_mask, other=0.0).to(dt).to(tl.float32)

    qh = tl.arange(0, Q_PAD)
    q_off = t * stride_qt + qh * stride_qh
    q1, q2, qmask = _rotate(Q, q_off, qh < NUM_Q, d, half_mask, c1, s1, c2, s2, HALF)
    tl.store(Q + q_off[:, None] + d[None, :], q1, mask=qmask)
    tl.store(Q + q_off[:, None] + HALF + d[None, :], q2, mask=qmask)

    kh = tl.arange(0, KV_PAD)
    k_off = t * stride_kt + kh * stride_kh
    k1, k2, kmask = _rotate(K, k_off, kh < NUM_KV, d, half_mask, c1, s1, c2, s2, HALF)
    tl.store(K + k_off[:, None] + d[None, :], k1, mask=kmask)
    tl.store(K + k_off[:, None] + HALF + d[None, :], k2, mask=kmask)

    block = (slot // BLOCK_SIZE).to(tl.int64)
    row = slot % BLOCK_SIZE
    kc = KCache + block * stride_kcb + row * stride_kct + kh[:, None] * stride_kch
    tl.store(kc + d[None, :], k1, mask=kmask)
    tl.store(kc + HALF + d[None, :], k2, mask=kmask)
    v_off = t * stride_vt + kh * stride_vh
    v1 = tl.load(V + v_off[:, None] + d[None, :], mask=kmask, other=0.0)
    v2 = tl.load(V + v_off[:, None] + HALF + d[None, :], mask=kmask, other=0.0)
    vc = VCache + block * stride_vcb + row * stride_vct + kh[:, None] * stride_vch
    tl.store(vc + d[None, :], v1, mask=kmask)
    tl.store(vc + HALF + d[None, :], v2, mask=kmask)


def rope_and_write_kv(q, k, v, cos_cache, sin_cache, positions, slot_mapping, k_cache, v_cache) -> None:
    """q [T, H, D], k/v [T, KVH, D] (rows may be strided); cos/sin caches [max_pos, D] float32.
    Rotates q and k in place and writes k, v at their slots of the paged cache."""
    tokens, num_q, head_dim = q.shape
    num_kv = k.shape[1]
    half = head_dim // 2
    _rope_and_write_kv_kernel[(tokens,)](
        q,
        k,
        v,
        cos_cache,
        sin_cache,
        positions,
        slot_mapping,
        k_cache,
        v_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q=num_q,
        NUM_KV=num_kv,
        Q_PAD=triton.next_power_of_2(num_q),
        KV_PAD=triton.next_power_of_2(num_kv),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        BLOCK_SIZE=k_cache.shape[1],
    )


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(Out + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block)
    return out
