"""RMSNorm as transformers computes it, and the residual add fused into it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from services.engine.backends.base import Backend, NormKernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.kernel: NormKernel | None = None  # the backend's add + norm, chosen by finalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: weight * (x / rms(x) in float32, cast back to the model dtype)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, same values
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def finalize(self, backend: Backend) -> None:
        """Once the weight is loaded: the backend's kernel for add_norm."""
        self.kernel = backend.rms_norm(self)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); the first layer passes residual=None. The kernel
        may update `residual` in place."""
        assert self.kernel is not None, "the model was not finalized"
        return self.kernel(x, residual)
