"""CPU backend on pdserve's AVX-512 decode kernels (float32; services/engine/kernels/cpu.py).

Decode-sized work runs in the kernels: linears of at most MAX_LINEAR_ROWS rows (a skinny GEMM on
weights packed in 16-column tiles, the weight also kept in oneDNN's layout for prefill-sized
inputs), residual-add + RMSNorm, SiLU*mul, and per layer one call doing RoPE, the K/V write and
attention over each sequence's exact context, reading the paged pool in place (no mirror).
Prefill, and anything with more rows, runs as the torch backend does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.kernels.cpu import MAX_LINEAR_ROWS, CpuKernels
from services.engine.layers.norm import RMSNorm

from .base import LinearKernel, Metadata, StepInputs
from .reference import OneDnnLinear, TorchBackend


class SkinnyLinear:
    """The kernels' GEMM for decode-sized inputs, oneDNN's for larger ones (the weight is held in
    both layouts)."""

    def __init__(self, kernels: CpuKernels, weight: torch.Tensor, bias: torch.Tensor | None):
        self.kernels = kernels
        self.large = OneDnnLinear(weight, bias)
        self.tiles = kernels.pack_linear(weight)
        self.out_features = weight.shape[0]
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= MAX_LINEAR_ROWS:
            return self.kernels.linear(x, self.tiles, self.out_features, self.bias)
        return self.large(x)


@dataclass
class KernelDecodeMetadata(Metadata):
    cos: torch.Tensor  # [B, D] float32
    sin: torch.Tensor
    block_tables: torch.Tensor  # [B, blocks] int32
    context_lens: torch.Tensor  # [B] int32


class CpuKernelBackend(TorchBackend):
    name = "cpu-kernels"

    def __init__(self, kernels: CpuKernels, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "mirror_bytes": 0})  # attention reads the pool in place
        self.kernels = kernels

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        return SkinnyLinear(self.kernels, weight, bias)

    def add_rms_norm(self, x, residual, norm: RMSNorm):
        if x.shape[0] <= MAX_LINEAR_ROWS:
            return self.kernels.add_rms_norm(x, residual, norm.weight, norm.eps)
        return super().add_rms_norm(x, residual, norm)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.shape[0] <= MAX_LINEAR_ROWS:
            return self.kernels.silu_mul(gate_up)
        return super().silu_mul(gate_up)

    def attention(self, layer, qkv, meta, k_cache, v_cache):
        if not isinstance(meta, KernelDecodeMetadata):
            return super().attention(layer, qkv, meta, k_cache, v_cache)  # prefill
        s = self.shape
        return self.kernels.decode_attention(
            qkv,
            meta.cos,
            meta.sin,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            s.scale,
        )

    def decode_metadata(self, inputs: StepInputs) -> KernelDecodeMetadata:  # type: ignore[override]
        assert inputs.block_tables is not None and inputs.context_lens is not None
        cos, sin = self._rope(inputs.positions)
        return KernelDecodeMetadata(False, cos, sin, inputs.block_tables, inputs.context_lens)
