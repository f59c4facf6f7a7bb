"""Paged decode attention in Triton: reads K/V blocks in place through the block table.

One program per (sequence, KV head) handles that head's whole group of query heads (GQA), so each
K/V element is read from memory once per step. Tokens are visited TOKENS at a time with an online
softmax; a tile may span several blocks (each token finds its block through the table), so the
block size does not constrain the tile. No gather copy, static shapes: safe inside CUDA graphs.

On CPU the same kernel runs under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests
check it against the torch reference path without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    Q,
    K,
    V,
    Out,
    BlockTables,
    ContextLens,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(ContextLens + seq)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(
        Q + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0
    )

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    for start in range(0, context_len, TOKENS):
        t = start + tl.arange(0, TOKENS)
        t_ok = t < context_len
        block = tl.load(BlockTables + seq * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        row = t % BLOCK_SIZE
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + (block * stride_kb + row * stride_kt + kv_head * stride_kh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TOKENS]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(
            V + (block * stride_vb + row * stride_vt + kv_head * stride_vh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / denom[:, None]
    tl.store(
        Out + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=g_ok[:, None] & d_ok[None, :],
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    tokens_per_tile: int = 64,
) -> torch.Tensor:
    """q [B, H, D]; k_cache/v_cache [num_blocks, block_size, KVH, D] (strided views of the pool);
    block_tables [B, max_blocks] int32; context_lens [B] int32 (>= 1). Returns [B, H, D]."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        TOKENS=tokens_per_tile,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
