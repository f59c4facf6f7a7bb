"""Backends: how the model's math runs on a device, one chosen per engine when it loads.

- `torch` (reference.py): the reference, plain torch ops on any device.
- `cpu-kernels` (cpu_kernels.py): float32 on x86-64 CPUs with AVX-512, pdserve's own decode kernels.
- `triton` (triton.py): CUDA, Triton kernels and CUDA graphs.

`EngineConfig.backend = "auto"` takes triton on CUDA, and on CPU the kernels for float32 where
they build (else torch, with the reason logged).
"""

from __future__ import annotations

import logging

import torch

from services.engine.config import EngineConfig, ModelConfig
from services.engine.kernels import cpu
from services.engine.layers.rotary import RotaryEmbedding

from .base import AttentionShape, Backend
from .cpu_kernels import CpuKernelBackend
from .reference import TorchBackend

log = logging.getLogger(__name__)


def choose_backend(config: EngineConfig, head_dim: int) -> str:
    """The backend `config.backend` means on this machine; raises ValueError, saying why, when the
    one named cannot run here."""
    name, device = config.backend, torch.device(config.device)
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        if config.dtype != "float32" or head_dim % 16:
            return "torch"
        return "cpu-kernels" if cpu.load() is not None else "torch"
    if name == "triton" and device.type != "cuda":
        raise ValueError("backend 'triton' needs a CUDA device")
    if name == "cpu-kernels":
        if device.type != "cpu" or config.dtype != "float32" or head_dim % 16:
            raise ValueError(
                f"backend 'cpu-kernels' needs float32 on the CPU and head_dim a multiple of 16 "
                f"(this is {config.dtype} on {config.device}, head_dim {head_dim})"
            )
        if cpu.load() is None:
            raise ValueError(f"backend 'cpu-kernels' cannot run here: {cpu.unavailable_reason() or 'see the log'}")
    return name


def select_backend(
    config: EngineConfig, model_config: ModelConfig, rotary: RotaryEmbedding, shape: AttentionShape, num_layers: int
) -> Backend:
    """The backend for a model's `num_layers` layers (a pipeline stage's, or all)."""
    name = choose_backend(config, model_config.head_dim)
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    # No decode K/V mirror on a pipeline stage: it orders each step's rows by its own memory budget,
    # which a stage with fewer layers could decide differently from the next (rows must line up
    # between stages), and the stage's micro-batches would evict each other from it every step.
    mirror_bytes = config.cpu_decode_kv_mirror_bytes if config.pipeline_parallel == 1 else 0
    common = dict(num_layers=num_layers, block_size=config.block_size, mirror_bytes=mirror_bytes)
    if name == "cpu-kernels":
        kernels = cpu.load()
        assert kernels is not None
        return CpuKernelBackend(kernels, shape, rotary, device, dtype, **common)
    if name == "triton":
        from .triton import TritonBackend  # imports triton, which only CUDA machines need installed

        return TritonBackend(shape, rotary, device, dtype, **common)
    return TorchBackend(shape, rotary, device, dtype, **common)
