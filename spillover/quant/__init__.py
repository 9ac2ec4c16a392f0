"""Weight formats (one class per format: pack() + forward()), importers and model quantization."""

from __future__ import annotations

from typing import Any

import torch

from spillover.quant.bf16 import Bf16Weight
from spillover.quant.fp8 import Fp8BlockWeight
from spillover.quant.grouped import GroupedIntWeight
from spillover.quant.int4 import Int4Weight
from spillover.quant.int8 import Int8Weight

QuantFormat = Bf16Weight | Int4Weight | Int8Weight | Fp8BlockWeight | GroupedIntWeight

FORMATS: dict[str, Any] = {
    "bf16": Bf16Weight, "int4": Int4Weight, "int8": Int8Weight, "fp8_block": Fp8BlockWeight,
}


def pack_weight(weight: torch.Tensor, quant: str, group_size: int | None = None, symmetric: bool = True,
                act_dtype: torch.dtype = torch.bfloat16) -> QuantFormat:
    """Pack a float [N, K] / [E, N, K] weight into `quant` (bf16 | int4 | int8 | fp8_block)."""
    if quant == "int4":
        return Int4Weight.pack(weight, group_size or 128, symmetric, act_dtype=act_dtype)
    if quant == "int8":
        return Int8Weight.pack(weight, group_size, act_dtype=act_dtype)
    if quant == "fp8_block":
        return Fp8BlockWeight.pack(weight, act_dtype=act_dtype)
    if quant == "bf16":
        return Bf16Weight.pack(weight, act_dtype)
    raise ValueError(f"unknown quant format {quant!r}; choose from {sorted(FORMATS)}")


def format_from_tensors(parts: dict[str, torch.Tensor], meta: dict[str, Any],
                        act_dtype: torch.dtype = torch.bfloat16) -> QuantFormat:
    cls = FORMATS[meta["format"]]
    fmt: QuantFormat = cls.from_tensors(parts, meta, act_dtype)
    return fmt


__all__ = ["Bf16Weight", "Fp8BlockWeight", "GroupedIntWeight", "Int4Weight", "Int8Weight", "QuantFormat",
           "FORMATS", "pack_weight", "format_from_tensors"]
