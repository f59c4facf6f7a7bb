"""GPU and model shapes the analytic profile and the placement search need.

GPU numbers are vendor datasheet peaks (dense, no sparsity), per GPU:
  - A100-80G SXM4: 312 TFLOP/s bf16, 2.039 TB/s HBM2e, NVLink3 600 GB/s total (300 GB/s per
    direction); HDR InfiniBand 200 Gbit/s per GPU (a DGX A100 has one HCA per GPU).
  - H100-80G SXM5: 989 TFLOP/s bf16, 3.35 TB/s HBM3, NVLink4 900 GB/s total (450 per direction);
    NDR 400 Gbit/s per GPU.
  - H200 SXM: same compute as H100, 4.8 TB/s HBM3e, 141 GB; NVLink and NIC as H100.
  - L40S: 362 TFLOP/s bf16 (733 is the sparse figure), 864 GB/s GDDR6, 48 GB; no NVLink, so GPUs
    in a node talk over PCIe Gen4 x16 (~32 GB/s per direction); 100 Gbit/s Ethernet assumed
    between nodes.
Interconnect numbers are one-direction bytes/s, which is what a transfer or a ring all-reduce
sees. Clusters differ most in the network between nodes: DistServe's testbed had 25 Gbit/s, so
every number here can be overridden from the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

GiB = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_flops: float  # dense bf16/fp16 FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: float
    intra_node_bytes_per_s: float  # NVLink (or PCIe) per GPU, one direction
    inter_node_bytes_per_s: float  # network per GPU, one direction


GPUS: dict[str, GpuSpec] = {
    "A100-80G": GpuSpec("A100-80G", 312e12, 2.039e12, 80 * GiB, 300e9, 25e9),
    "H100-80G": GpuSpec("H100-80G", 989e12, 3.35e12, 80 * GiB, 450e9, 50e9),
    "H200": GpuSpec("H200", 989e12, 4.8e12, 141e9, 450e9, 50e9),
    "L40S": GpuSpec("L40S", 362e12, 864e9, 48 * GiB, 32e9, 12.5e9),
}
_GPU_ALIASES = {
    "a100": "A100-80G",
    "a100-80g": "A100-80G",
    "a100-80gb": "A100-80G",
    "h100": "H100-80G",
    "h100-80g": "H100-80G",
    "h100-sxm": "H100-80G",
    "h200": "H200",
    "l40s": "L40S",
}


def get_gpu(name: str) -> GpuSpec:
    key = name if name in GPUS else _GPU_ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


@dataclass(frozen=True)
class ClusterSpec:
    num_nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    max_nodes_per_instance: int | None = None  # N of Algorithms 1-2; None = all nodes
    memory_utilization: float = 0.9  # fraction of GPU memory the engine may use
    activation_reserve_bytes: float = 4 * GiB  # per GPU: activations, workspace, CUDA graphs

    @property
    def total_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def node_limit(self) -> int:
        return min(self.max_nodes_per_instance or self.num_nodes, self.num_nodes)

    def with_bandwidths(self, intra: float | None = None, inter: float | None = None) -> ClusterSpec:
        gpu = self.gpu
        if intra:
            gpu = replace(gpu, intra_node_bytes_per_s=intra)
        if inter:
            gpu = replace(gpu, inter_node_bytes_per_s=inter)
        return replace(self, gpu=gpu)


@dataclass(frozen=True)
class ModelShape:
    """What the latency and memory models need to know about a decoder-only transformer."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True  # SwiGLU (Llama family): 3 MLP matrices; OPT: 2
    tied_embeddings: bool = False
    max_model_len: int = 4096
    dtype_bytes: int = 2

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return h * (q + 2 * kv) + q * h + mlp

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.layer_params + embed

    @property
    def weight_bytes(self) -> int:
        return self.num_params() * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim


def _llama(name, h, layers, heads, kv, inter, vocab, ctx) -> ModelShape:
    return ModelShape(name, h, layers, heads, kv, h // heads, inter, vocab, True, False, ctx)


def _opt(name, h, layers, heads) -> ModelShape:
    return ModelShape(name, h, layers, heads, heads, h // heads, 4 * h, 50272, False, True, 2048)


# Shapes from each model's published config.json.
MODELS: dict[str, ModelShape] = {
    "llama-2-7b": _llama("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, 4096),
    "llama-2-13b": _llama("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, 4096),
    "llama-2-70b": _llama("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, 4096),
    "llama-3-8b": _llama("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, 8192),
    "llama-3-70b": _llama("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, 8192),
    "opt-13b": _opt("opt-13b", 5120, 40, 40),
    "opt-66b": _opt("opt-66b", 9216, 64, 72),
    "opt-175b": _opt("opt-175b", 12288, 96, 96),
}
# DistServe's model sizes are OPT models.
_MODEL_ALIASES = {"13b": "opt-13b", "66b": "opt-66b", "175b": "opt-175b"}


def get_model_shape(name_or_dir: str, dtype_bytes: int = 2) -> ModelShape:
    """A preset name, or a folder (or config.json path) of a Hugging Face checkpoint."""
    key = name_or_dir.lower()
    key = _MODEL_ALIASES.get(key, key)
    if key in MODELS:
        return replace(MODELS[key], dtype_bytes=dtype_bytes)
    path = name_or_dir
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{name_or_dir!r} is neither a model preset ({', '.join(MODELS)}) nor a checkpoint folder")
    with open(path) as f:
        return shape_from_hf_config(
            json.load(f), name=os.path.basename(os.path.dirname(os.path.abspath(path))), dtype_bytes=dtype_bytes
        )


def shape_from_hf_config(cfg: dict, name: str = "model", dtype_bytes: int = 2) -> ModelShape:
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    if cfg.get("model_type") == "opt":
        return ModelShape(
            name,
            hidden,
            cfg["num_hidden_layers"],
            heads,
            heads,
            hidden // heads,
            cfg["ffn_dim"],
            cfg["vocab_size"],
            gated_mlp=False,
            tied_embeddings=True,
            max_model_len=cfg.get("max_position_embeddings", 2048),
            dtype_bytes=dtype_bytes,
        )
    return ModelShape(
        name=name,
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        gated_mlp=True,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_model_len=cfg.get("max_position_embeddings", 4096),
        dtype_bytes=dtype_bytes,
    )
