"""RMSNorm variants: plain (w·x̂), zero-centred ((1+w)·x̂, Qwen3-Next) and gated (Gated
DeltaNet output)."""

from __future__ import annotations

import torch
from torch import nn

from spillover import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset  # 1.0 for zero-centred weights stored near 0
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.offset)

    def add_norm(self, x: torch.Tensor,
                 residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused with the norm reading it."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps, self.offset)


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x) · w · silu(z), per value head (norm before gate); w used as is."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rms_norm(x, z, self.weight, self.eps)
