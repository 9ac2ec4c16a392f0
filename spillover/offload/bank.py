"""ExpertBank: where routed experts' math happens. The MoE layer routes; the bank computes.

`forward(hidden [T, H], topk_ids [T, k], topk_weights [T, k]) -> [T, H]`. Models never know where
experts live; tiered (GPU slots + pinned host + disk) banks implement the same protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeGuard

import torch
from torch import nn

from spillover.offload.experts import grouped_experts

if TYPE_CHECKING:
    from spillover.quant import QuantFormat, WeightFormat


class ExpertBank(Protocol):
    num_experts: int
    # True while forward must read the routing on the host (experts outside GPU slots): a CUDA
    # graph of a decode step is cut before such a bank's call.
    host_decides: bool

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        ...

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        """nn.Module's call (forward hooks, e.g. `spillover profile`'s routing recorder)."""
        ...


class ResidentExpertBank(nn.Module):
    """All experts of one layer stacked on one device: w13 [E, 2I, H], w2 [E, H, I]."""

    SLOTS = ("w13", "w2")  # the stacked projections, named as their float parameters
    host_decides = False

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate),
                               requires_grad=False)
        # Packed stacked formats (spillover.quant), installed by quantize_model or the loader; when
        # set, the matching float parameter is released and forward takes the grouped path.
        self.w13_fmt: QuantFormat | None = None
        self.w2_fmt: QuantFormat | None = None

    def install(self, name: str, fmt: WeightFormat, device: torch.device | None = None) -> None:
        """Hold `fmt` (stacked experts) as projection `name` ("w13" or "w2") and release its float
        parameter, leaving a 0-element stand-in on `device` (default: where the parameter was; a
        loader filling a model built on meta passes a real device, so no meta tensor survives)."""
        if name not in self.SLOTS:
            raise KeyError(f"an expert bank holds {self.SLOTS}, not {name!r}")
        param: nn.Parameter = getattr(self, name)
        shape = (self.num_experts, fmt.out_features, fmt.in_features)
        if not fmt.stacked or fmt.num_experts != self.num_experts or (
                param.dim() == 3 and tuple(param.shape) != shape):
            raise ValueError(f"{name}: a stacked {list(param.shape)} format expected, got {fmt!r}")
        setattr(self, f"{name}_fmt", fmt)
        where = param.device if device is None else device
        setattr(self, name, nn.Parameter(torch.empty(0, device=where), requires_grad=False))

    def formats(self) -> dict[str, WeightFormat | None]:
        """{"w13": format or None, "w2": ...}: None where the projection is still a float
        parameter."""
        return {"w13": self.w13_fmt, "w2": self.w2_fmt}

    def stacked(self) -> tuple[WeightFormat, WeightFormat]:
        """(w13, w2) as stacked formats; a projection kept in float is wrapped (no copy)."""
        from spillover.quant.bf16 import Bf16Weight

        w13 = self.w13_fmt if self.w13_fmt is not None else Bf16Weight(self.w13.data, stacked=True)
        w2 = self.w2_fmt if self.w2_fmt is not None else Bf16Weight(self.w2.data, stacked=True)
        return w13, w2

    def append_expert(self, w13: WeightFormat, w2: WeightFormat) -> bool:
        """Stack one more expert (w13 [2I, H], w2 [H, I]) after the routed ones, as expert
        `num_experts`: a shared expert then runs in the routed experts' kernel launches. False
        (nothing changed) where its formats do not join the stacks'."""
        s13, s2 = self.stacked()
        a13 = s13.append_experts(w13) if hasattr(s13, "append_experts") else None
        a2 = s2.append_experts(w2) if hasattr(s2, "append_experts") else None
        if a13 is None or a2 is None:
            return False
        for name, fmt in (("w13", a13), ("w2", a2)):
            setattr(self, f"{name}_fmt", fmt)
            where = getattr(self, name).device
            setattr(self, name, nn.Parameter(torch.empty(0, device=where), requires_grad=False))
        return True

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        return grouped_experts(hidden, topk_ids, topk_weights, *self.stacked())


def is_expert_bank(module: nn.Module) -> TypeGuard[ResidentExpertBank]:
    """Whether loading and quantization fill `module` as an expert bank (through `install`); tiered
    banks are built afterwards from a filled resident one."""
    return isinstance(module, ResidentExpertBank)
