"""CUDA backend on Triton kernels (services/engine/kernels/triton_*.py): fused add+RMSNorm,
SiLU*mul, RoPE + K/V write, and paged decode attention reading blocks in place. Prefill attention
is the torch backend's SDPA (a chunked-prefill step's chunks too; its one-token rows take the paged
decode kernel). Its decode metadata has static shapes, so decode steps are captured
as CUDA graphs (runner.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.kernels.triton_attention import paged_decode_attention
from services.engine.kernels.triton_fused import add_rms_norm, rope_and_write_kv, silu_and_mul
from services.engine.layers.norm import RMSNorm

from .base import CachedContext, LinearKernel, Metadata, NormKernel, StepInputs
from .reference import TorchBackend, TorchLinear, cached_context_attention, prefill_attention


@dataclass
class TritonMetadata(Metadata):
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    cu_seqlens: list[int] | None = None  # prefill
    cached: CachedContext | None = None  # chunked prefill: sequences with K/V in the pool already
    block_tables: torch.Tensor | None = None  # decode [B, blocks] int32
    context_lens: torch.Tensor | None = None  # decode [B] int32


class TritonBackend(TorchBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "mirror_bytes": 0})

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        return TorchLinear(weight, bias)

    def rms_norm(self, norm: RMSNorm) -> NormKernel:
        weight, eps = norm.weight.detach(), norm.eps

        def add_norm(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            if residual is None:
                return add_rms_norm(x, None, weight, eps), x
            return add_rms_norm(x, residual, weight, eps), residual  # residual updated in place

        return add_norm

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)

    def attention(self, layer, qkv, meta, k_cache, v_cache):
        assert isinstance(meta, TritonMetadata)
        s = self.shape
        tokens = qkv.shape[0]
        q = qkv[:, : s.q_size].view(tokens, s.num_heads, s.head_dim)
        k = qkv[:, s.q_size : s.q_size + s.kv_size].view(tokens, s.num_kv_heads, s.head_dim)
        v = qkv[:, s.q_size + s.kv_size :].view(tokens, s.num_kv_heads, s.head_dim)
        rope_and_write_kv(
            q, k, v, self.rotary.cos, self.rotary.sin, meta.positions, meta.slot_mapping, k_cache, v_cache
        )  # q and k rotated in place
        if meta.is_prefill and meta.cached is not None:
            ctx = meta.cached
            out = cached_context_attention(
                q,
                k_cache,
                v_cache,
                ctx,
                s.scale,
                lambda q: paged_decode_attention(q, k_cache, v_cache, ctx.decode_tables, ctx.decode_lens, s.scale),
            )
        elif meta.is_prefill:
            assert meta.cu_seqlens is not None
            out = prefill_attention(q, k, v, meta.cu_seqlens, s.scale)
        else:
            assert meta.block_tables is not None and meta.context_lens is not None
            out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, s.scale)
        return out.reshape(tokens, s.q_size)

    def prefill_metadata(self, inputs: StepInputs) -> TritonMetadata:  # type: ignore[override]
        return TritonMetadata(
            True, inputs.positions, inputs.slot_mapping, cu_seqlens=inputs.cu_seqlens, cached=inputs.cached
        )

    def decode_metadata(self, inputs: StepInputs) -> TritonMetadata:  # type: ignore[override]
        return TritonMetadata(
            False,
            inputs.positions,
            inputs.slot_mapping,
            block_tables=inputs.block_tables,
            context_lens=inputs.context_lens,
        )
