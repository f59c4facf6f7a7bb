"""Rotary position embedding (rotate-half, as transformers), its tables computed with transformers'
own RoPE init for every supported rope type."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.engine.config import ModelConfig, rope_parameters


class RotaryEmbedding(nn.Module):
    """cos/sin [max_positions, head_dim] in float32, on the model's device."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device):
        super().__init__()
        inv_freq, attention_scaling = _rope_inv_freq(config)
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * attention_scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of each position [T, head_dim], cast to the model dtype (as transformers does)."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def _rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config.hf_config)
    if params["rope_type"] == "default":
        dim = config.head_dim
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config.hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
