"""Linear layers in the shapes tensor parallelism needs (Megatron-LM's column/row split).

Each layer holds this rank's part of its weight; `load` copies a checkpoint tensor's part into it,
and once every weight is loaded `finalize` hands the weight to the kernel the backend chose (on
CPU it is repacked there: the layer then drops its own copy).

- `Linear`: the whole weight on every rank (the LM head).
- `ColumnParallelLinear`: output features split across ranks; no communication.
- `MergedColumnParallelLinear`: several column-parallel outputs in one matrix (gate | up).
- `QKVParallelLinear`: q, k and v projections in one matrix, split by heads; K/V heads are
  replicated when there are more ranks than K/V heads.
- `RowParallelLinear`: input features split across ranks; the partial outputs are summed with an
  all-reduce (the attention output and MLP down projections).

Without tensor parallelism a layer has `NO_TP`; the ranks of a tensor-parallel instance
(engine/parallel.py) each have a `TensorParallel` with their process group's all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from services.engine.backends.base import Backend


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group."""

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], None] | None = None  # sums a tensor over the group, in place

    def split(self, total: int, what: str) -> int:
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}")
        return total // self.size

    def kv_heads(self, total: int) -> int:
        """This rank's K/V heads: its share, or one (replicated) when there are more ranks than heads."""
        if self.size > total and self.size % total:
            raise ValueError(
                f"tensor-parallel size {self.size} is neither a divisor nor a multiple of the {total} K/V heads"
            )
        return max(1, total // self.size)


NO_TP = TensorParallel()
Shard = str | int | None  # which checkpoint tensor of a merged weight ("q", "k", "v"; 0, 1 for gate, up)


class Linear(nn.Module):
    """y = x @ weight.T + bias, the whole weight on every rank."""

    shards: tuple[Shard, ...] = (None,)  # the checkpoint tensors that together fill this layer's weight

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel = NO_TP):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.weight: torch.Tensor | None = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None

    def load(self, name: str, loaded: torch.Tensor, shard: Shard = None) -> None:
        """Copies this rank's part of checkpoint tensor `loaded` into parameter `name` ("weight" or "bias")."""
        param = getattr(self, name)
        rows, part = self.place(loaded, shard, name == "bias")
        target = param.data if rows is None else param.data[rows]
        if tuple(target.shape) != tuple(part.shape):
            raise ValueError(
                f"shape {tuple(loaded.shape)} does not fit (this rank's part: {tuple(part.shape)} "
                f"into {tuple(target.shape)})"
            )
        target.copy_(part.to(dtype=param.dtype))

    def place(self, loaded: torch.Tensor, shard: Shard, is_bias: bool) -> tuple[slice | None, torch.Tensor]:
        """(rows of the local parameter it fills, or None for all; the part of `loaded` that goes there)."""
        return None, loaded

    def finalize(self, backend: Backend) -> None:
        assert self.weight is not None, "finalized twice"
        self.kernel = backend.linear(self.weight.detach(), None if self.bias is None else self.bias.detach())
        self.weight = None  # the kernel holds it (packed copies on CPU): one copy in memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.kernel is not None, "the model was not finalized"
        return self.kernel(x)


class ColumnParallelLinear(Linear):
    """Output features split across ranks: rank r holds rows [r*n, (r+1)*n) of the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel = NO_TP):
        super().__init__(in_features, tp.split(out_features, "output features"), bias, tp)

    def place(self, loaded, shard, is_bias):
        n = self.out_features
        return None, loaded.narrow(0, self.tp.rank * n, n)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input stacked in one weight (gate | up);
    shard i is the checkpoint tensor of part i."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, tp: TensorParallel = NO_TP):
        self.output_sizes = [tp.split(size, "output features") for size in output_sizes]  # this rank's
        self.shards = tuple(range(len(output_sizes)))
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def place(self, loaded, shard, is_bias):
        assert isinstance(shard, int)
        start, size = sum(self.output_sizes[:shard]), self.output_sizes[shard]
        return slice(start, start + size), loaded.narrow(0, self.tp.rank * size, size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections stacked as [q heads | k heads | v heads] of this rank. Ranks split the
    query heads; K/V heads are split too, or replicated when the group is larger than their number
    (each rank then keeps the K/V head its query heads attend to)."""

    shards = ("q", "k", "v")

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TensorParallel = NO_TP
    ):
        self.head_dim = head_dim
        self.num_heads = tp.split(num_heads, "attention heads")
        self.num_kv_heads = tp.kv_heads(num_kv_heads)
        self.kv_rank = tp.rank // max(1, tp.size // num_kv_heads)  # which K/V head group this rank keeps
        width = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        Linear.__init__(self, hidden_size, width, bias, tp)

    def place(self, loaded, shard, is_bias):
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        start, size, index = {"q": (0, q, self.tp.rank), "k": (q, kv, self.kv_rank), "v": (q + kv, kv, self.kv_rank)}[
            str(shard)
        ]
        return slice(start, start + size), loaded.narrow(0, index * size, size)


class RowParallelLinear(Linear):
    """Input features split across ranks: rank r holds columns [r*n, (r+1)*n) of the weight, gets
    the matching part of the input (a column-parallel layer's output), and the ranks' partial
    outputs are summed by an all-reduce. The bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel = NO_TP):
        super().__init__(tp.split(in_features, "input features"), out_features, bias, tp)

    def place(self, loaded, shard, is_bias):
        if is_bias:
            return None, loaded
        n = self.in_features
        return None, loaded.narrow(1, self.tp.rank * n, n)

    def finalize(self, backend: Backend) -> None:
        if self.tp.size == 1:
            return super().finalize(backend)
        assert self.weight is not None, "finalized twice"
        self.kernel = backend.linear(self.weight.detach(), None)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.kernel is not None, "the model was not finalized"
        y = self.kernel(x)
        if self.tp.size > 1:
            assert self.tp.all_reduce is not None
            self.tp.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        return y
