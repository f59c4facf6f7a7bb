"""Loads Hugging Face weights (safetensors, single file or sharded index) into `CausalLM`.

Hugging Face keeps q/k/v and gate/up as separate matrices; the model keeps them merged, so each
such tensor goes to its shard of the merged layer, whose `load` knows where (layers/linear.py,
which also cuts a tensor-parallel rank's part).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .layers.linear import Linear, Shard
from .model import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
# checkpoint module name -> (our module name, shard)
_MERGED: dict[str, tuple[str, Shard]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


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
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                yield key, f.get_tensor(key)


def _target(src: str) -> tuple[str, str, Shard]:
    """Checkpoint tensor name -> (our module path, parameter name, shard)."""
    if src == "model.embed_tokens.weight":
        return "embed_tokens", "weight", None
    if src == "model.norm.weight":
        return "norm", "weight", None
    if src == "lm_head.weight":
        return "lm_head", "weight", None
    m = _LAYER.match(src)
    if not m:
        raise ValueError(f"unexpected weight {src!r} in checkpoint")
    module, _, param = m.group(2).rpartition(".")  # e.g. self_attn.q_proj , weight
    parent, _, leaf = module.rpartition(".")
    if leaf in _MERGED:
        leaf, shard = _MERGED[leaf]
        return f"layers.{m.group(1)}.{parent}.{leaf}", param, shard
    return f"layers.{m.group(1)}.{module}", param, None


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    tied = model.config.tie_word_embeddings
    modules = dict(model.named_modules())
    # (module path, parameter) -> the shards still to load
    expected: dict[tuple[str, str], set[Shard]] = {}
    for path, module in modules.items():
        for param_name, _ in module.named_parameters(recurse=False):
            if path == "lm_head" and tied:
                continue
            expected[(path, param_name)] = set(module.shards if isinstance(module, Linear) else (None,))

    for src, tensor in weights:
        if _IGNORED.search(src) or (src == "lm_head.weight" and tied):
            continue
        path, param_name, shard = _target(src)
        if not model.holds(path):
            continue  # another pipeline stage's
        module = modules.get(path)
        if module is None or (path, param_name) not in expected:
            raise ValueError(f"unexpected weight {src!r} in checkpoint")
        try:
            if isinstance(module, Linear):
                module.load(param_name, tensor, shard)
            else:
                _copy(getattr(module, param_name), tensor)
        except ValueError as exc:
            raise ValueError(f"weight {src!r}: {exc}") from None
        expected[(path, param_name)].discard(shard)
    missing = sorted(f"{path}.{name}" for (path, name), shards in expected.items() if shards)
    if missing:
        raise ValueError(
            f"checkpoint is missing weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )


def _copy(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(tensor.to(dtype=param.dtype))


def init_random_weights(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """Random weights without a checkpoint (benchmarks of large shapes)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, std, generator=gen)
