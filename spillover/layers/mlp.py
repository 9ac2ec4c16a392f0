"""Gated MLP (SwiGLU): down(silu(gate(x)) * up(x)), with gate and up merged in one matmul."""

from __future__ import annotations

import torch
from torch import nn

from spillover import kernels
from spillover.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        if act != "silu":
            raise ValueError(f"unsupported activation {act!r} (only silu)")
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, shards=[intermediate, intermediate])
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))
