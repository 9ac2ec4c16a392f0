"""RMSNorm variants: plain (w·x̂), zero-centred ((1+w)·x̂, Qwen3-Next) and gated (Gated
DeltaNet output)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x) · w · silu(z), per value head (norm before gate); w used as is."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(dtype)
        return (y * F.silu(z.float())).to(dtype)
