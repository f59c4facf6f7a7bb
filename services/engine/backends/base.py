"""What every backend provides. A backend is how the model's math runs on one device: the model's
layers call it for their linears, fused norms and activations, and attention. One is chosen when
the engine loads (backends/__init__.py) and every layer holds that one; it builds the metadata
each step needs from the runner's `StepInputs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.engine.kv_cache import KvPool
    from services.engine.layers.norm import RMSNorm
    from services.engine.layers.rotary import RotaryEmbedding

LinearKernel = Callable[[torch.Tensor], torch.Tensor]  # x -> x @ weight.T + bias
# (x, residual or None) -> (RMSNorm(x + residual), x + residual); may update residual in place
NormKernel = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttentionShape:
    """This rank's attention heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


@dataclass
class CachedContext:
    """A prefill step in which some sequences already have K/V in the pool (chunked prefill: a
    prompt's later chunks, and the running sequences' next tokens beside them). Attention runs
    after the step's own K/V are in the pool: the one-token rows in one batch, as a decode step
    attends, and each chunk over its sequence's blocks."""

    decode_rows: torch.Tensor  # [Bd] int64: rows adding one token to a cached context (may be none)
    decode_tables: torch.Tensor  # [Bd, blocks] int32
    decode_lens: torch.Tensor  # [Bd] int32, context including the new token
    decode_max_len: int
    chunks: list[tuple[int, int, int, torch.Tensor]]  # (first row, rows, tokens cached before, its block ids)


@dataclass
class StepInputs:
    """One step's batch as the runner lays it out (tensors on the model's device)."""

    seq_ids: list[str]
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block * block_size + row, where each token's K/V goes
    cu_seqlens: list[int] | None = None  # prefill: prompt boundaries in the packed token dimension
    block_tables: torch.Tensor | None = None  # decode: [B, blocks] int32
    context_lens: torch.Tensor | None = None  # decode: [B] int32, tokens in cache including this step's
    context_lens_list: list[int] | None = None  # decode: the same as Python ints
    cached: CachedContext | None = None  # prefill: None when every sequence starts from its first token


@dataclass
class Metadata:
    """What a backend's attention needs about one step; each backend extends it."""

    is_prefill: bool


class Backend(ABC):
    name: str
    supports_cuda_graphs = False

    def __init__(self, shape: AttentionShape, rotary: RotaryEmbedding, device: torch.device, dtype: torch.dtype):
        self.shape = shape
        self.rotary = rotary
        self.device = device
        self.dtype = dtype

    # ---- the layers' operations -------------------------------------------------------------------
    @abstractmethod
    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        """The kernel a linear layer runs with these (loaded) weights; it may keep them in another layout."""

    @abstractmethod
    def rms_norm(self, norm: RMSNorm) -> NormKernel:
        """The kernel a norm runs for its residual add + RMSNorm, with its (loaded) weight."""

    @abstractmethod
    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of gate_up [T, 2I] = (gate | up)."""

    @abstractmethod
    def attention(
        self, layer: int, qkv: torch.Tensor, meta: Metadata, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """qkv [T, (H + 2*KVH) * D] of one layer -> attention output [T, H * D]: RoPE on q and k,
        this step's K/V written to the layer's pool views, attention over each sequence's context."""

    # ---- per step ---------------------------------------------------------------------------------
    @abstractmethod
    def prefill_metadata(self, inputs: StepInputs) -> Metadata: ...

    @abstractmethod
    def decode_metadata(self, inputs: StepInputs) -> Metadata: ...

    def decode_order(self, seq_ids: list[str], context_lens: list[int]) -> list[int] | None:
        """The order the backend wants a decode batch in (indices into it), or None for as given."""
        return None

    def end_step(self, meta: Metadata, kv_pool: KvPool) -> None:
        """After the forward pass (a backend that deferred its pool writes does them here)."""

    def forget(self, seq_id: str) -> None:
        """The sequence's KV blocks were given up: drop anything cached about them."""

    def release_idle_memory(self) -> None:
        """No sequence is running: free what is kept between steps (sized for the largest batch
        seen; made again as needed)."""
