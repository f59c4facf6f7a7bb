"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over packed tokens and a paged KV pool.

Numerics follow `transformers` operation for operation (RMSNorm in float32, rotate-half RoPE with
cos/sin cast to the model dtype, residual adds in the model dtype) so that float32 logits agree with
the reference to ~1e-5. q/k/v and gate/up projections are merged into one matmul each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, decode_attention_torch, dense_decode_attention, prefill_attention, write_kv
from .config import ModelConfig
from .cpu_kernels import MAX_LINEAR_ROWS, CpuKernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers: weight * (x / rms(x) in float32, cast back to the model dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, same values
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    kernels = None  # CpuKernels, set by prepare_for_cpu

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); the first layer passes residual=None."""
        if self.kernels is not None and x.dim() == 2 and x.shape[0] <= MAX_LINEAR_ROWS:
            return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)  # residual updated in place
        if x.is_cuda and x.dim() == 2:
            from .triton_fused import add_rms_norm

            if residual is None:
                return add_rms_norm(x, None, self.weight, self.eps), x
            return add_rms_norm(x, residual, self.weight, self.eps), residual  # residual updated in place
        residual = x if residual is None else x + residual
        return self(residual), residual


class RotaryEmbedding(nn.Module):
    """cos/sin for every position up to max_model_len, computed with transformers' own rope init."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq, attention_scaling = _rope_inv_freq(config)
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def _rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from .config import rope_parameters

    params = rope_parameters(config.hf_config)
    if params["rope_type"] == "default":
        dim = config.head_dim
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config.hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class PackedLinear(nn.Module):
    """A CPU linear layer whose weight is pre-packed in oneDNN's blocked format, and with the CPU
    kernels also in the skinny GEMM's tiles for decode-sized inputs (cpu_kernels.py; the weight
    is then held twice, for ~1.5x faster decode steps).

    At decode batch sizes (8-64 rows) oneDNN's packed weight runs 2-3x faster than `F.linear`,
    which re-lays out the matrix on every call; at prefill sizes it is no slower. Results differ
    from `F.linear` only by summation order (~1e-6 relative)."""

    def __init__(self, linear: nn.Linear, kernels: CpuKernels | None = None, expected_rows: int = 16):
        super().__init__()
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), expected_rows)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.kernels = kernels
        self.tiles = kernels.pack_linear(linear.weight) if kernels is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dim() == 2 and x.shape[0] <= MAX_LINEAR_ROWS:
            return self.kernels.linear(x, self.tiles, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def prepare_for_cpu(model: "CausalLM", kernels: CpuKernels | None) -> None:
    """Packs every nn.Linear (PackedLinear) and, with `kernels` (float32 only), routes decode-sized
    norms, SiLU and attention through them. Packing is skipped without oneDNN."""
    if torch.backends.mkldnn.is_available():
        targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                   if isinstance(child, nn.Linear)]
        for parent, name, child in targets:
            setattr(parent, name, PackedLinear(child, kernels))
    if kernels is None:
        return
    model.kernel_attention = kernels.supports_attention(model.config.head_dim)
    for module in model.modules():
        if isinstance(module, (RMSNorm, MLP)) or (isinstance(module, Attention) and model.kernel_attention):
            module.kernels = kernels


class Attention(nn.Module):
    kernels = None  # CpuKernels for decode attention over the paged pool, set by prepare_for_cpu

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rotary, positions, meta: AttentionMetadata, k_cache, v_cache):
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.kernels is not None and not meta.is_prefill:
            return self.o_proj(self._kernel_decode_attention(qkv, meta, k_cache, v_cache))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if x.is_cuda:
            from .triton_fused import rope_and_write_kv

            rope_and_write_kv(q, k, v, rotary.cos, rotary.sin, positions, meta.slot_mapping, k_cache, v_cache)
        else:
            if self.q_norm is None:  # q and k sit side by side in qkv: rotate both in one pass
                qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(tokens, -1, self.head_dim), meta.cos, meta.sin)
                q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            else:
                q, k = apply_rope(q, meta.cos, meta.sin), apply_rope(k, meta.cos, meta.sin)
            if meta.kv_mirror is None:  # the mirror writes the pool once per step, all layers at once
                write_kv(k_cache, v_cache, k, v, meta.slot_blocks, meta.slot_rows)
        if meta.is_prefill:
            out = prefill_attention(q, k, v, meta.cu_seqlens, self.scale)
        elif meta.kv_mirror is not None:
            k_dense, v_dense = meta.kv_mirror.views(
                self.layer_idx, k_cache, v_cache, meta.block_tables, k, v, meta.context_lens_list
            )
            out = meta.kv_mirror.attention(q, k_dense, v_dense, meta.decode_mask, self.scale, dense_decode_attention)
        elif meta.use_triton:
            from .triton_attention import paged_decode_attention

            out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        else:
            out = decode_attention_torch(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.max_context_len, self.scale
            )
        return self.o_proj(out.reshape(tokens, self.q_size))

    def _kernel_decode_attention(self, qkv, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
        if self.q_norm is not None:  # the kernel applies RoPE in place, so normalise in place first
            tokens = qkv.shape[0]
            q = qkv[:, : self.q_size].view(tokens, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(tokens, self.num_kv_heads, self.head_dim)
            q.copy_(self.q_norm(q))
            k.copy_(self.k_norm(k))
        return self.kernels.paged_decode_attention(qkv, meta.cos, meta.sin, k_cache, v_cache, meta.block_tables,
                                                   meta.context_lens, self.num_heads, self.num_kv_heads,
                                                   self.head_dim, self.scale)


class MLP(nn.Module):
    kernels = None  # CpuKernels, set by prepare_for_cpu

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda:
            from .triton_fused import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        if self.kernels is not None and gate_up.shape[0] <= MAX_LINEAR_ROWS:
            return self.down_proj(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rotary, positions, meta, k_cache, v_cache):
        """Returns (this layer's MLP output, the residual stream before it); the next layer's
        norm adds the two, so each residual add fuses into a norm (same sums as transformers)."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h = self.self_attn(h, rotary, positions, meta, k_cache, v_cache)
        h, residual = self.post_attention_layernorm.add_norm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None  # computed by init_rotary once on a real device
        self.kernel_attention = False  # decode attention by cpu_kernels (prepare_for_cpu): no K/V mirror then
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_rotary(self, max_positions: int, device: torch.device) -> None:
        self.rotary = RotaryEmbedding(self.config, max_positions).to(device)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_pool, logits_indices=None):
        """Returns logits [N, vocab] for the tokens at `logits_indices` (all when None)."""
        x = self.embed_tokens(input_ids)
        if not x.is_cuda:  # the CUDA kernels index the cos/sin tables themselves
            meta.cos, meta.sin = self.rotary(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, self.rotary, positions, meta, kv_pool.key_cache(i), kv_pool.value_cache(i))
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        return self.lm_head(self.norm.add_norm(x, residual)[0])
