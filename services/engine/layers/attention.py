"""Self-attention of one layer. The layer owns the projections (and Qwen3's q/k norms); the
backend does the rest: RoPE, writing this step's K/V into the paged pool, and attention over
each sequence's context, from the metadata it built for the step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from services.engine.config import ModelConfig

from .linear import NO_TP, QKVParallelLinear, RowParallelLinear, TensorParallel
from .norm import RMSNorm

if TYPE_CHECKING:
    from services.engine.backends.base import Backend, Metadata


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, backend: Backend, tp: TensorParallel = NO_TP):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, bias=config.qkv_bias, tp=tp
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.head_dim = config.head_dim
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, bias=config.o_bias, tp=tp
        )
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, meta: Metadata, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (H + 2 * KVH) * D]
        if self.q_norm is not None and self.k_norm is not None:  # in place: the backend reads q/k from qkv
            tokens, q_size = qkv.shape[0], self.num_heads * self.head_dim
            q = qkv[:, :q_size].view(tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_size : q_size + self.num_kv_heads * self.head_dim].view(
                tokens, self.num_kv_heads, self.head_dim
            )
            q.copy_(self.q_norm(q))
            k.copy_(self.k_norm(k))
        return self.o_proj(self.backend.attention(self.layer_idx, qkv, meta, k_cache, v_cache))
