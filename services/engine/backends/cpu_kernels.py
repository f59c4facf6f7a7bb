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

from services.engine.kernels.cpu import MAX_LINEAR_ROWS, AttentionStep, CpuKernels
from services.engine.layers.norm import RMSNorm

from .base import LinearKernel, Metadata, NormKernel, StepInputs
from .reference import OneDnnLinear, TorchBackend


class SkinnyLinear:
    """The kernels' GEMM for decode-sized inputs, oneDNN's for larger ones (the weight is held in
    both layouts)."""

    def __init__(self, kernels: CpuKernels, weight: torch.Tensor, bias: torch.Tensor | None):
        self.large = OneDnnLinear(weight, bias)
        self.small = kernels.linear(weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x) if x.shape[0] <= MAX_LINEAR_ROWS else self.large(x)


@dataclass
class KernelDecodeMetadata(Metadata):
    attention: AttentionStep  # the step's positions, block tables and context lengths, for every layer


class CpuKernelBackend(TorchBackend):
    name = "cpu-kernels"

    def __init__(self, kernels: CpuKernels, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "mirror_bytes": 0})  # attention reads the pool in place
        self.kernels = kernels

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        return SkinnyLinear(self.kernels, weight, bias)

    def rms_norm(self, norm: RMSNorm) -> NormKernel:
        small, large = self.kernels.rms_norm(norm.weight.detach(), norm.eps), super().rms_norm(norm)

        def add_norm(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return small(x, residual) if x.shape[0] <= MAX_LINEAR_ROWS else large(x, residual)

        return add_norm

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.shape[0] <= MAX_LINEAR_ROWS:
            return self.kernels.silu_mul(gate_up)
        return super().silu_mul(gate_up)

    def attention(self, layer, qkv, meta, k_cache, v_cache):
        if not isinstance(meta, KernelDecodeMetadata):
            return super().attention(layer, qkv, meta, k_cache, v_cache)  # prefill
        return meta.attention(qkv, k_cache, v_cache)

    def decode_metadata(self, inputs: StepInputs) -> KernelDecodeMetadata:  # type: ignore[override]
        assert inputs.block_tables is not None and inputs.context_lens is not None
        cos, sin = self._rope(inputs.positions)
        s = self.shape
        step = self.kernels.attention_step(
            cos,
            sin,
            inputs.block_tables,
            inputs.context_lens,
            num_heads=s.num_heads,
            num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim,
            scale=s.scale,
        )
        return KernelDecodeMetadata(False, step)
