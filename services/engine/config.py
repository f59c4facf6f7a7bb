"""Configuration of the engine: what model, how it runs, how each request samples.

`ModelConfig` is read from a Hugging Face checkpoint's config.json through `transformers`' own
config classes, so defaults and legacy field names (rope_theta/rope_scaling against
rope_parameters) resolve exactly as the reference implementation resolves them.

Nothing here imports torch: the router reads the model's limits (vocabulary, context) from the same
`ModelConfig` as the engine without loading the engine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or option this engine does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    hf_config: Any = field(repr=False, compare=False, default=None)  # transformers' PretrainedConfig

    @classmethod
    def from_hf_config(cls, hf_config) -> ModelConfig:
        archs = list(getattr(hf_config, "architectures", None) or [])
        arch = archs[0] if archs else _arch_from_model_type(getattr(hf_config, "model_type", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        _check_supported_options(hf_config)
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        max_len = hf_config.max_position_embeddings
        window = _sliding_window(hf_config, arch)
        if window is not None:
            # Within the window, sliding-window attention is plain causal attention; capping the
            # context there keeps one attention path exact instead of adding a masked variant.
            max_len = min(max_len, window)
        model_type = hf_config.model_type
        attention_bias = bool(getattr(hf_config, "attention_bias", False)) and model_type != "mistral"
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_model_len=max_len,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
            eos_token_ids=eos_ids,
            hf_config=hf_config,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> ModelConfig:
        from transformers import AutoConfig

        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json in model directory {model_dir!r}")
        with open(path) as f:
            raw = json.load(f)
        if raw.get("model_type") not in _MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {raw.get('model_type')!r} is not supported; supported: "
                f"{', '.join(sorted(_MODEL_TYPES))} ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        config = cls.from_hf_config(AutoConfig.from_pretrained(model_dir))
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.exists(gen_path):
            # generate() stops on generation_config's eos ids, which may list more than config.json.
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            if gen_eos is not None:
                ids = tuple(gen_eos) if isinstance(gen_eos, list) else (gen_eos,)
                config = replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + ids)))
        return config

    @property
    def kv_elements_per_token(self) -> int:
        """Number of K and V elements one token occupies over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _arch_from_model_type(model_type: str) -> str:
    return _MODEL_TYPES.get(model_type, model_type or "<unknown>")


def rope_parameters(hf_config) -> dict:
    """RoPE settings whichever transformers version parsed the config (rope_parameters in v5,
    rope_theta + rope_scaling before)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers < 5
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _check_supported_options(hf_config) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; supported: 'silu'")
    if getattr(hf_config, "mlp_bias", False):
        raise UnsupportedModelError("mlp_bias=True is not supported; supported: mlp_bias=False")
    rope_type = rope_parameters(hf_config)["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if getattr(hf_config, "quantization_config", None):
        raise UnsupportedModelError("quantized checkpoints are not supported; supported: unquantized weights")
    heads, kv_heads = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None)
    if kv_heads and heads % kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )


def _sliding_window(hf_config, arch: str) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    if arch == "MistralForCausalLM" or getattr(hf_config, "use_sliding_window", False):
        return int(window)
    return None


# How the model's math runs (services/engine/backends): "torch" is the reference on any device;
# "auto" picks triton on CUDA and, for float32 on CPU, the AVX-512 kernels where they build.
BACKENDS = ("auto", "torch", "cpu-kernels", "triton")


@dataclass(frozen=True)
class EngineConfig:
    """How one worker runs its model.

    The KV pool is sized from `kv_cache_bytes` when given; otherwise on CUDA from
    `gpu_memory_utilization` of the device's total memory after weights, on CPU from a fixed
    default budget.
    """

    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_bytes: int = 256 << 20
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    backend: str = "auto"  # one of BACKENDS
    # CPU decode on the torch backend keeps a dense copy of the running batch's K/V up to this size
    # (0: off); see backends/kv_mirror.py. The CPU kernels read the pool in place and keep none.
    cpu_decode_kv_mirror_bytes: int = 256 << 20
    seed: int = 0
    # full blocks' K/V kept under their content hash and reused by later prompts (block_manager.py)
    enable_prefix_caching: bool = False
    kv_pool_name: str | None = None  # shared-memory name; generated when None
    # ranks of this instance, one process each, the model's heads and MLP split among them (parallel.py)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # stages, the layers split among them; tensor_parallel ranks each
    # a decode pass's micro-batches on a pipeline (1: none, the batch goes whole; 0: one per stage).
    # Whole by default: cut, each stage reads its weights once per micro-batch, which cost more than
    # the overlap won in bench/pipeline.py (docs/benchmarks.md)
    pipeline_micro_batches: int = 1
    # every rank on `device` itself, its collectives over gloo through host memory (slow): for checking
    # a parallel layout's outputs on a machine with fewer GPUs than ranks; else rank r on cuda:k+r
    ranks_share_device: bool = False
    # hosts (pods) the ranks are spread over, whole stages each: this process is rank 0 on the first,
    # listening at `rendezvous` (host:port) for the others' followers (engine/follower.py)
    pods: int = 1
    rendezvous: str = ""

    def __post_init__(self):
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}")
        if not (self.device in ("cpu", "emulated") or self.device.startswith("cuda")):
            raise ValueError(f"device {self.device!r} is not supported; supported: cpu, cuda[:N], emulated")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be at least 1, got {self.tensor_parallel}")
        if self.pipeline_parallel < 1:
            raise ValueError(f"pipeline_parallel must be at least 1, got {self.pipeline_parallel}")
        if self.pipeline_micro_batches < 0:
            raise ValueError(
                f"pipeline_micro_batches: 1 (whole), 0 (one per stage) or more, got {self.pipeline_micro_batches}"
            )
        if self.pods < 1 or self.pipeline_parallel % self.pods:
            raise ValueError(
                f"pods: {self.pods} pods must each hold whole pipeline stages of the {self.pipeline_parallel}"
            )
        if self.pods > 1 and not self.rendezvous:
            raise ValueError("pods: an instance over several pods needs a rendezvous address for their followers")

    @property
    def ranks_per_pod(self) -> int:
        return self.ranks // self.pods

    @property
    def ranks(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy. Requests are validated where they
    arrive (services/common/validation.py), not here."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = whole vocabulary
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # compute the chosen token's logprob (NaN otherwise)
    min_tokens: int = 0  # EOS and stop tokens cannot be sampled before this many output tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage` of `pp`: contiguous, the first stages one more when pp
    does not divide the layers (kvstore/shards.py lays out their KV the same way)."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))
