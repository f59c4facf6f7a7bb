"""The reference backend: plain torch ops on any device.

Prefill runs causal SDPA per packed prompt. Decode on CPU attends over a dense copy of the running
batch's K/V kept between steps (kv_mirror.py) while it fits `cpu_decode_kv_mirror_bytes`;
otherwise (and on CUDA) it gathers each sequence's blocks into a padded tensor and masks past its
length. On CPU, linear weights are repacked once into oneDNN's blocked layout, which decode-sized
inputs run markedly faster on than `F.linear` (it re-lays out the matrix on every call) and prefill
sizes no slower; results differ from `F.linear` only by summation order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.common.arith import ceil_div
from services.engine.kv_cache import KvPool
from services.engine.layers.norm import RMSNorm
from services.engine.layers.rotary import RotaryEmbedding, apply_rope

from .base import AttentionShape, Backend, CachedContext, LinearKernel, Metadata, NormKernel, StepInputs
from .kv_mirror import DecodeKvMirror

# oneDNN keeps a compiled primitive per input shape, in its own cache and in ideep's for the linear
# ops, 1,024 of each unless these say otherwise. Prompts and batches of every size fill both, and a
# worker keeps hundreds of MB it never gives back (docs/reliability.md has the figures); 64 of each
# keep what a decode batch reuses step after step. Read when oneDNN first runs, so set on import.
for _capacity in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_capacity, "64")


class TorchLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@functools.cache
def _onednn_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class OneDnnLinear:
    """The weight pre-packed in oneDNN's blocked format (CPU, float32 and bfloat16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, expected_rows: int = 16):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, expected_rows)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@dataclass
class TorchPrefillMetadata(Metadata):
    cu_seqlens: list[int]
    cos: torch.Tensor  # [T, D] RoPE of each token, in the model dtype
    sin: torch.Tensor
    slot_blocks: torch.Tensor  # [T] block of each token's K/V slot
    slot_rows: torch.Tensor  # [T] row within it
    cached: CachedContext | None  # chunked prefill: sequences with K/V in the pool already


@dataclass
class TorchDecodeMetadata(Metadata):
    cos: torch.Tensor
    sin: torch.Tensor
    slot_blocks: torch.Tensor
    slot_rows: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    context_lens_list: list[int]
    mirrored: bool  # the batch occupies the mirror's slots 0..B-1: attend over the mirror
    mask: torch.Tensor | None  # mirrored: [B, 1, 1, span], the positions each query may see


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        shape: AttentionShape,
        rotary: RotaryEmbedding,
        device: torch.device,
        dtype: torch.dtype,
        *,
        num_layers: int,
        block_size: int,
        mirror_bytes: int,
    ):
        super().__init__(shape, rotary, device, dtype)
        self.block_size = block_size
        self.mirror = None
        if device.type == "cpu" and mirror_bytes > 0:
            self.mirror = DecodeKvMirror(num_layers, shape.num_kv_heads, shape.head_dim, dtype, mirror_bytes)

    # ---- operations -------------------------------------------------------------------------------
    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        if (
            self.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            # oneDNN's bfloat16 path needs AVX-512 (or AVX-NE-CONVERT); without it, torch's own
            and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _onednn_bf16()))
        ):
            return OneDnnLinear(weight, bias)
        return TorchLinear(weight, bias)

    def rms_norm(self, norm: RMSNorm) -> NormKernel:
        def add_norm(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            residual = x if residual is None else x + residual
            return norm(residual), residual

        return add_norm

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attention(self, layer, qkv, meta, k_cache, v_cache):
        s = self.shape
        tokens = qkv.shape[0]
        assert isinstance(meta, (TorchPrefillMetadata, TorchDecodeMetadata))
        # q and k sit side by side in qkv: rotated in one pass
        qk = apply_rope(qkv[:, : s.q_size + s.kv_size].view(tokens, -1, s.head_dim), meta.cos, meta.sin)
        q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
        v = qkv[:, s.q_size + s.kv_size :].view(tokens, s.num_kv_heads, s.head_dim)
        if isinstance(meta, TorchPrefillMetadata):
            write_kv(k_cache, v_cache, k, v, meta.slot_blocks, meta.slot_rows)
            if meta.cached is None:
                out = prefill_attention(q, k, v, meta.cu_seqlens, s.scale)
            else:
                ctx = meta.cached
                out = cached_context_attention(
                    q,
                    k_cache,
                    v_cache,
                    ctx,
                    s.scale,
                    lambda q: decode_attention(
                        q, k_cache, v_cache, ctx.decode_tables, ctx.decode_lens, ctx.decode_max_len, s.scale
                    ),
                )
        elif meta.mirrored:
            assert self.mirror is not None and meta.mask is not None
            k_dense, v_dense = self.mirror.views(
                layer, k_cache, v_cache, meta.block_tables, k, v, meta.context_lens_list
            )
            out = self.mirror.attention(q, k_dense, v_dense, meta.mask, s.scale, dense_decode_attention)
        else:
            write_kv(k_cache, v_cache, k, v, meta.slot_blocks, meta.slot_rows)
            out = decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, max(meta.context_lens_list), s.scale
            )
        return out.reshape(tokens, s.q_size)

    # ---- per step ---------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(positions, self.dtype)

    def _slots(self, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.div(slot_mapping, self.block_size, rounding_mode="floor")
        return blocks, slot_mapping - blocks * self.block_size

    def prefill_metadata(self, inputs: StepInputs) -> TorchPrefillMetadata:
        assert inputs.cu_seqlens is not None
        if inputs.cached is not None and self.mirror is not None:
            self.mirror.clear()  # this step moves cached sequences on in the pool, not in the mirror
        cos, sin = self._rope(inputs.positions)
        return TorchPrefillMetadata(True, inputs.cu_seqlens, cos, sin, *self._slots(inputs.slot_mapping), inputs.cached)

    def decode_order(self, seq_ids: list[str], context_lens: list[int]) -> list[int] | None:
        if self.mirror is None:
            return None
        return self.mirror.prepare(seq_ids, context_lens)  # None: over its budget, gather instead

    def decode_metadata(self, inputs: StepInputs) -> TorchDecodeMetadata:
        assert inputs.block_tables is not None and inputs.context_lens is not None and inputs.context_lens_list
        cos, sin = self._rope(inputs.positions)
        lens = inputs.context_lens_list
        mirrored = self.mirror is not None and self.mirror.seq_ids == inputs.seq_ids
        mask = None
        if mirrored:
            assert self.mirror is not None
            mask = context_mask(inputs.context_lens, max(lens))
            self.mirror.begin_step(lens)
        return TorchDecodeMetadata(
            False,
            cos,
            sin,
            *self._slots(inputs.slot_mapping),
            inputs.block_tables,
            inputs.context_lens,
            lens,
            mirrored,
            mask,
        )

    def end_step(self, meta: Metadata, kv_pool: KvPool) -> None:
        if isinstance(meta, TorchDecodeMetadata) and meta.mirrored:
            assert self.mirror is not None
            # the mirror writes the pool once per step, all layers at once
            self.mirror.write_step_to_pool(kv_pool.tensor, meta.slot_blocks, meta.slot_rows)
            self.mirror.advance(meta.context_lens_list)

    def forget(self, seq_id: str) -> None:
        if self.mirror is not None:
            self.mirror.drop(seq_id)

    def release_idle_memory(self) -> None:
        if self.mirror is not None:
            self.mirror.clear()  # up to cpu_decode_kv_mirror_bytes after a burst of long batches


# ---- the reference operations, also what other backends are tested against ----------------------
def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Scatters K/V of T tokens [T, kv_heads, head_dim] into (block, row) slots."""
    k_cache.index_put_((blocks, rows), k)
    v_cache.index_put_((blocks, rows), v)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention within each packed prompt. q [T, H, D], k/v [T, KVH, D] -> [T, H, D]."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        qi = q[start:end].transpose(0, 1).unsqueeze(0)
        ki = k[start:end].transpose(0, 1).unsqueeze(0)
        vi = v[start:end].transpose(0, 1).unsqueeze(0)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa)
        out[start:end] = oi.squeeze(0).transpose(0, 1)
    return out


def cached_context_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: CachedContext,
    scale: float,
    decode: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A chunked-prefill step's attention, its K/V in the pool already: `decode` (the backend's
    decode attention) for the one-token rows, `chunk_attention` for each chunk. q [T, H, D]."""
    out = torch.empty_like(q)
    if ctx.decode_rows.numel():
        out[ctx.decode_rows] = decode(q[ctx.decode_rows])
    for row, rows, cached, blocks in ctx.chunks:
        out[row : row + rows] = chunk_attention(q[row : row + rows], k_cache, v_cache, blocks, cached, scale)
    return out


def chunk_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, cached: int, scale: float
) -> torch.Tensor:
    """The queries of one sequence's tokens cached..cached+n-1 [n, H, D] against its K/V of tokens
    0..cached+n-1, read from its blocks; each sees the tokens up to its own."""
    end = cached + q.shape[0]
    k = k_cache[blocks].flatten(0, 1)[:end].transpose(0, 1)  # [KVH, end, D]
    v = v_cache[blocks].flatten(0, 1)[:end].transpose(0, 1)
    keys = torch.arange(end, device=q.device)
    mask = keys[None, :] <= torch.arange(cached, end, device=q.device)[:, None]  # [n, end]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[0],
    )
    return out.squeeze(0).transpose(0, 1)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its paged context. q [B, H, D] -> [B, H, D].

    The blocks are gathered with index_select along the block dimension of a head-major view of
    the pool, so the result is already [KVH, B, S, D] with each [S, D] matrix contiguous, which
    SDPA reads without another copy (advanced indexing, or gathering in the pool's own order and
    permuting, costs several times more on CPU)."""
    batch, _, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = ceil_div(max_context_len, block_size)
    flat_blocks = block_tables[:, :num_blocks].reshape(-1).long()
    span = num_blocks * block_size

    def gather(cache):  # [NB, BS, KVH, D] -> [B, KVH, span, D]
        # The leading unit dimension is deliberate: torch 2.13's index_select takes a much slower
        # path for this 4-D strided view than for the same data viewed in 5-D.
        g = torch.index_select(cache.permute(2, 0, 1, 3).unsqueeze(0), 2, flat_blocks)
        return g.view(kv_heads, batch, span, head_dim).transpose(0, 1)

    return dense_decode_attention(q, gather(k_cache), gather(v_cache), context_mask(context_lens, span), scale)


def context_mask(context_lens: torch.Tensor, span: int) -> torch.Tensor:
    """[B, 1, 1, span]: True where a position is inside the sequence's context."""
    positions = torch.arange(span, device=context_lens.device)
    return (positions[None, :] < context_lens[:, None]).view(-1, 1, 1, span)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """q [B, H, D] against k/v [B, KVH, span, D]; mask [B, 1, 1, span] marks the valid positions."""
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.squeeze(2)
