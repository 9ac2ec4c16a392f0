"""int4 weight-only format: group 128 (default) or 32, symmetric or asymmetric (float min per group)."""

from __future__ import annotations

import torch

from spillover.quant.grouped import GroupedIntWeight
from spillover.quant.packing import pack_int4, rtn_int4


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
        """RTN-quantize a dense [N, K] or stacked [E, N, K] float weight (one expert at a time)."""
        stacked = weight.dim() == 3
        w3 = weight if stacked else weight.unsqueeze(0)
        qs, ss, ms = [], [], []
        for e in range(w3.shape[0]):  # bounds the float32 temporaries to one expert
            codes, scales, mins = rtn_int4(w3[e], group_size, symmetric, scale_dtype)
            qs.append(pack_int4(codes))
            ss.append(scales)
            if mins is not None:
                ms.append(mins)
        return cls(torch.stack(qs), torch.stack(ss), torch.stack(ms) if ms else None,
                   group_size=group_size, stacked=stacked, act_dtype=act_dtype)
