"""int8 weight-only format: symmetric per output channel (default) or per group along K.

Also the lossless target of GGUF Q8_0 (G = 32), Q6_K (G = 16) and Q5_K (G = 32 with mins).
"""

from __future__ import annotations

import torch

from spillover.quant.grouped import GroupedIntWeight
from spillover.quant.packing import RowPacker


class Int8Weight(GroupedIntWeight):
    name = "int8"
    bits = 8

    @classmethod
    def pack(
        cls,
        weight: torch.Tensor,
        group_size: int | None = None,
        scale_dtype: torch.dtype = torch.float16,
        act_dtype: torch.dtype = torch.bfloat16,
    ) -> Int8Weight:
        """Quantize [N, K] or [E, N, K]; group_size None means per channel (one group of K)."""
        stacked = weight.dim() == 3
        g = group_size or weight.shape[-1]
        parts = RowPacker(8, g, True, scale_dtype).pack(weight)
        lead = weight.shape[:-1] if stacked else (-1,)
        q, s = (parts[n].reshape(*lead, parts[n].shape[-1]) for n in ("qweight", "scales"))
        return cls(q, s, None, group_size=g, stacked=stacked, act_dtype=act_dtype)

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features
