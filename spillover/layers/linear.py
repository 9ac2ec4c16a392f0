"""Linear layer whose weight format is injected.

A `Linear` starts as a plain dense weight [out, in]. The quantization package may replace it with
a packed `spillover.quant.WeightFormat` (`linear.set_format(fmt)`), which then owns the packed
tensors and the matmul; model files never know which format runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from spillover.quant import WeightFormat


class Linear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, bias: bool = False,
        shards: list[int] | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # A merged projection (q|k|v, gate|up) lists its parts' output sizes; the loader fills
        # part i of the checkpoint into rows [sum(shards[:i]), sum(shards[:i+1])).
        self.shards = shards or [out_features]
        assert sum(self.shards) == out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.fmt: WeightFormat | None = None

    def set_format(self, fmt: WeightFormat, device: torch.device | None = None) -> None:
        """Swap the dense weight for a packed one; the dense tensor is released.

        `device` places the 0-element stand-in left as `weight` (default: where the weight was); a
        loader filling a model built on meta passes a real device, so that no meta tensor survives.
        """
        self.fmt = fmt
        where = self.weight.device if device is None else device
        self.weight = nn.Parameter(torch.empty(0, device=where), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is not None:
            y = self.fmt.forward(x)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        fmt = self.fmt.name if self.fmt is not None else "dense"
        return (f"in={self.in_features}, out={self.out_features}, "
                f"bias={self.bias is not None}, fmt={fmt}")
