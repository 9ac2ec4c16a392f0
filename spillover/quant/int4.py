"""int4 weight-only format: group 128 (default) or 32, symmetric or asymmetric (float
min per group)."""

from __future__ import annotations

import torch

from spillover.quant.grouped import GroupedIntWeight
from spillover.quant.packing import RowPacker


class Int4Weight(GroupedIntWeight):
    name = "int4"
    bits = 4

    @classmethod
    def pack(
        cls,
        weight: torch.Tensor,
        group_size: int = 128,
        symmetric: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        act_dtype: torch.dtype = torch.bfloat16,
    ) -> Int4Weight:
        """RTN-quantize a dense [N, K] or stacked [E, N, K] float weight, a few MB of
        rows at a time."""
        stacked = weight.dim() == 3
        parts = RowPacker(4, group_size, symmetric, scale_dtype).pack(weight)
        lead = weight.shape[:-1] if stacked else (-1,)
        shaped = {n: t.reshape(*lead, t.shape[-1]) for n, t in parts.items()}
        return cls(shaped["qweight"], shaped["scales"], shaped.get("mins"), group_size=group_size,
                   stacked=stacked, act_dtype=act_dtype)
