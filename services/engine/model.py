"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over packed tokens and a paged KV pool.

Numerics follow `transformers` operation for operation (RMSNorm in float32, rotate-half RoPE with
cos/sin cast to the model dtype, residual adds in the model dtype), so float32 logits agree with
the reference to ~1e-5. q/k/v and gate/up projections are merged into one matmul each. Every layer
computes through the backend the engine chose (services/engine/backends).

A pipeline stage (engine/parallel.py) holds only its layers, the first stage the embeddings, the
last the final norm and LM head; a stage's output is the hidden state and the residual stream,
which the next stage takes instead of tokens.
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
    def __init__(self, config: ModelConfig, backend: Backend, tp: TensorParallel = NO_TP, layers: range | None = None):
        """`layers`: a pipeline stage's (default: all). Modules are named as in the checkpoint
        (layers.<global index>), each layer's KV in the stage's pool at its index in the stage."""
        super().__init__()
        self.config = config
        self.layer_range = layers if layers is not None else range(config.num_layers)
        self.first = self.layer_range.start == 0
        self.last = self.layer_range.stop == config.num_layers
        tied = config.tie_word_embeddings
        embedded = self.first or (tied and self.last)  # a tied LM head is the embedding matrix
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if embedded else None
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, i - self.layer_range.start, backend, tp) for i in self.layer_range}
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.last else None
        # the whole vocabulary on each rank of the last stage
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False) if self.last else None
        self.tie_weights()
        self.backend = backend

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.lm_head is not None:
            assert self.embed_tokens is not None
            self.lm_head.weight = self.embed_tokens.weight

    def holds(self, module_path: str) -> bool:
        """Whether a checkpoint module (our naming) is on this stage."""
        head, _, rest = module_path.partition(".")
        if head == "layers":
            index = rest.partition(".")[0]
            # a layer the model does not have counts as held: loading it then fails, naming it
            return index in self.layers or not (index.isdigit() and int(index) < self.config.num_layers)
        return getattr(self, head, None) is not None

    def finalize(self) -> None:
        """Once the weights are loaded, every layer takes its kernel from the backend: norms their
        add + norm, linear layers their GEMM, to which they hand their weight and drop their own
        parameter (on CPU the kernel keeps repacked copies: one copy in memory), so from here on the
        linear weights are not in `parameters()` or `state_dict()`."""
        for module in self.modules():
            if isinstance(module, (Linear, RMSNorm)):
                module.finalize(self.backend)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: Metadata,
        kv_pool: KvPool,
        logits_indices: torch.Tensor | None = None,
        carried: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits [N, vocab] for the tokens at `logits_indices` (all when None). A stage
        after the first takes the previous stage's output `carried` instead of embedding the
        tokens; a stage before the last returns its own: [2, tokens, hidden], the hidden state and
        the residual stream."""
        if carried is None:
            assert self.embed_tokens is not None
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = carried[0], carried[1]
        for i, layer in enumerate(self.layers.values()):
            x, residual = layer(x, residual, meta, kv_pool.key_cache(i), kv_pool.value_cache(i))
        assert residual is not None
        if not self.last:
            return torch.stack((x, residual))
        assert self.norm is not None and self.lm_head is not None
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        return self.lm_head(self.norm.add_norm(x, residual)[0])
