"""Unquantized format: the weight kept as a float tensor (bf16 on the GPU, float32 in CPU tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# Rows up to which float experts on CUDA gather each row's matrix instead of grouping by expert.
GATHER_MAX_ROWS = 16


class WeightShape:
    """Shape members of a format that holds one `weight` tensor, [N, K] or stacked [E, N, K]."""

    weight: torch.Tensor
    stacked: bool

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0] if self.stacked else 1

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]


class Bf16Weight(WeightShape):
    name = "bf16"

    def __init__(self, weight: torch.Tensor, stacked: bool | None = None) -> None:
        self.weight = weight
        self.stacked = weight.dim() == 3 if stacked is None else stacked
        self.act_dtype = weight.dtype

    @classmethod
    def pack(cls, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> Bf16Weight:
        return cls(weight.to(dtype).contiguous())

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        return self.weight[expert] if expert is not None else self.weight

    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor,
                        sparse: bool = False) -> torch.Tensor:
        if sparse:
            from spillover.kernels.quant_dispatch import zero_dead_rows

            return zero_dead_rows(expert_ids, lambda ids: self.forward_experts(x, ids))
        if x.is_cuda and x.shape[0] <= GATHER_MAX_ROWS:
            # Decode-sized: each row reads its expert's matrix; listing the experts would sync.
            w = self.weight[expert_ids]  # [T, N, K]
            return torch.bmm(w, x.to(w.dtype).unsqueeze(-1)).squeeze(-1).to(x.dtype)
        y = torch.empty(x.shape[0], self.weight.shape[-2], dtype=x.dtype, device=x.device)
        for e in torch.unique(expert_ids).tolist():
            rows = (expert_ids == e).nonzero().squeeze(1)
            y[rows] = F.linear(x[rows].to(self.weight.dtype), self.weight[e]).to(x.dtype)
        return y

    def expert_forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight[expert]).to(x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def meta(self) -> dict[str, Any]:
        return {"format": self.name, "stacked": self.stacked}

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor], meta: dict[str, Any],
                     act_dtype: torch.dtype = torch.bfloat16) -> Bf16Weight:
        return cls(parts["weight"], stacked=bool(meta.get("stacked", False)))

    def append_experts(self, other: Any) -> Bf16Weight | None:
        """This stack with `other`'s experts (a stack, or a dense weight of the same shape) after
        its own; None where they do not join."""
        if (not isinstance(other, Bf16Weight) or not self.stacked
                or other.weight.dtype != self.weight.dtype
                or other.weight.shape[-2:] != self.weight.shape[-2:]):
            return None
        extra = other.weight.to(self.weight.device).reshape(-1, *self.weight.shape[-2:])
        return type(self)(torch.cat([self.weight, extra]), stacked=True)

    # ---- expert subsets (tiered banks: GPU slots, host rows, staging) ---------------------------
    def take_experts(self, experts: Sequence[int]) -> Bf16Weight:
        """The stacked weight of `experts` (in that order), same layout and device: a copy."""
        idx = torch.as_tensor(list(experts), dtype=torch.int64, device=self.weight.device)
        return type(self)(self.weight[idx], stacked=True)

    def expert_range(self, start: int, stop: int) -> Bf16Weight:
        """Experts start..stop-1 as a view (no copy: pinned RAM stays pinned)."""
        return type(self)(self.weight[start:stop], stacked=True)

    def put_experts_(self, slots: Sequence[int], src: Any) -> None:
        """Overwrite experts `slots` with `src`'s experts in order (same layout and device)."""
        idx = torch.as_tensor(list(slots), dtype=torch.int64, device=self.weight.device)
        for dst, part in zip((self.weight,), (src.weight,), strict=True):
            if dst is not None and part is not None:
                dst[idx] = part

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Bf16Weight:
        return type(self)(self.weight.to(device, non_blocking=non_blocking), self.stacked)

    @classmethod
    def concat(cls, formats: Sequence[Any], dim: int) -> Bf16Weight | None:
        """Rows (dim 1) or experts (dim 0) of the [E, N, K] view joined; None for another type or
        dtype (see `WeightFormat.concat`)."""
        first = formats[0]
        if any(type(f) is not type(first) or f.weight.dtype != first.weight.dtype for f in formats):
            return None
        if dim == 1:
            if any(f.stacked != first.stacked for f in formats):
                return None
            if len(formats) == 1:
                return first
            return type(first)(torch.cat([f.weight for f in formats], -2), first.stacked)
        if dim != 0:
            raise ValueError(f"concat along rows (1) or experts (0), not {dim}")
        stacks = [f.weight if f.stacked else f.weight.unsqueeze(0) for f in formats]
        return type(first)(stacks[0] if len(stacks) == 1 else torch.cat(stacks), stacked=True)

    def take_rows(self, rows: torch.Tensor) -> Bf16Weight:
        return type(self)(self.weight[..., rows, :], self.stacked)
