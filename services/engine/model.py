"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over packed tokens and a paged KV pool.

Numerics follow `transformers` operation for operation (RMSNorm in float32, rotate-half RoPE with
cos/sin cast to the model dtype, residual adds in the model dtype), so float32 logits agree with
the reference to ~1e-5. q/k/v and gate/up projections are merged into one matmul each. Every layer
computes through the backend the engine chose (services/engine/backends).
"""

from __future__ import annotations

import torch
from torch import nn

from .backends.base import Backend, Metadata
from .config import ModelConfig
from .kv_cache import KvPool
from .layers.attention import Attention
from .layers.linear import NO_TP, Linear, MergedColumnParallelLinear, RowParallelLinear, TensorParallel
from .layers.norm import RMSNorm


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend, tp: TensorParallel = NO_TP):
        super().__init__()
        self.backend = backend
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False, tp=tp
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.backend.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, backend: Backend, tp: TensorParallel = NO_TP):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, backend, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, backend, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: Metadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next layer's
        norm adds the two, so each residual add fuses into a norm (same sums as transformers)."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h = self.self_attn(h, meta, k_cache, v_cache)
        h, residual = self.post_attention_layernorm.add_norm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend, tp: TensorParallel = NO_TP):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)  # the whole vocabulary on each rank
        self.tie_weights()
        self.backend = backend

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def finalize(self) -> None:
        """Once the weights are loaded, every layer takes its kernel from the backend: norms their
        add + norm, linear layers their GEMM, to which they hand their weight and drop their own
        parameter (on CPU the kernel keeps repacked copies: one copy in memory), so from here on the
        linear weights are not in `parameters()` or `state_dict()`."""
        for module in self.modules():
            if isinstance(module, (Linear, RMSNorm)):
                module.finalize(self.backend)

    def forward(
        self, input_ids: torch.Tensor, meta: Metadata, kv_pool: KvPool, logits_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns logits [N, vocab] for the tokens at `logits_indices` (all when None)."""
        x = self.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, meta, kv_pool.key_cache(i), kv_pool.value_cache(i))
        assert residual is not None
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        return self.lm_head(self.norm.add_norm(x, residual)[0])
