"""Loads Hugging Face weights (safetensors, single file or sharded index) into `CausalLM`.

Hugging Face keeps q/k/v and gate/up as separate matrices; the model keeps them merged, so each
such tensor is copied into its slice of the merged parameter.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import torch

from .model import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r}")
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv_slices = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    mlp_slices = {"gate_proj": (0, cfg.intermediate_size), "up_proj": (cfg.intermediate_size, 2 * cfg.intermediate_size)}
    params = dict(model.named_parameters(remove_duplicate=False))
    expected: dict[str, int] = {}  # parameter name -> rows still to fill (merged params fill in slices)
    for name, p in params.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        expected[name] = p.shape[0]

    def copy(dst_name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None):
        dst = params[dst_name]
        target = dst.data if rows is None else dst.data[rows[0] : rows[1]]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {src!r}: shape {tuple(tensor.shape)} does not fit {dst_name} {tuple(target.shape)}")
        target.copy_(tensor.to(dtype=dst.dtype))
        expected[dst_name] -= target.shape[0]

    for src, tensor in weights:
        if _IGNORED.search(src):
            continue
        if src == "model.embed_tokens.weight":
            copy("embed_tokens.weight", tensor)
        elif src == "model.norm.weight":
            copy("norm.weight", tensor)
        elif src == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                copy("lm_head.weight", tensor)
        else:
            m = _LAYER.match(src)
            if not m:
                raise ValueError(f"unexpected weight {src!r} in checkpoint")
            layer, rest = m.group(1), m.group(2)
            prefix = f"layers.{layer}."
            module, _, kind = rest.rpartition(".")  # e.g. self_attn.q_proj , weight
            leaf = module.rsplit(".", 1)[-1]
            if leaf in qkv_slices:
                copy(f"{prefix}self_attn.qkv_proj.{kind}", tensor, qkv_slices[leaf])
            elif leaf in mlp_slices:
                copy(f"{prefix}mlp.gate_up_proj.{kind}", tensor, mlp_slices[leaf])
            elif f"{prefix}{rest}" in params:
                copy(f"{prefix}{rest}", tensor)
            else:
                raise ValueError(f"unexpected weight {src!r} in checkpoint")
    missing = sorted(name for name, rows in expected.items() if rows != 0)
    if missing:
        raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def init_random_weights(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """Random weights without a checkpoint (benchmarks of large shapes)."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, std, generator=gen)
