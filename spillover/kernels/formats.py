"""What the kernels read of a packed weight: the structural contracts the formats in
`spillover.quant` satisfy. Declared here, on the ground floor, so that the dispatch point can
take a format without importing the package that defines it (the formats import the kernels).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class IntWeight(Protocol):
    """An int4/int8 group-quantized weight (`quant.grouped.GroupedIntWeight`)."""

    group_size: int
    in_features: int
    out_features: int
    act_dtype: torch.dtype
    stacked: bool
    layout: str  # "nk" (storage, CPU), "kn" or "tiled" (GPU words)
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    cpu_cache: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]

    @property
    def bits(self) -> int: ...

    @property
    def kn_ok(self) -> bool: ...

    def to_layout(self, layout: str) -> Any: ...


class Fp8Weight(Protocol):
    """An FP8 block-scaled weight (`quant.fp8.Fp8BlockWeight`)."""

    weight: torch.Tensor
    block: int
    act_dtype: torch.dtype
    stacked: bool

    @property
    def block_shape(self) -> tuple[int, int]: ...

    def stacked_views(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def dequantize(self, expert: int | None = None) -> torch.Tensor: ...
