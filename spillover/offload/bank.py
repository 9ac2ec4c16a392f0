"""ExpertBank: where routed experts' math happens. The MoE layer routes; the bank computes.

`forward(hidden [T, H], topk_ids [T, k], topk_weights [T, k]) -> [T, H]`. Models never know where
experts live; tiered (GPU slots + pinned host + disk) banks implement the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class ExpertBank(Protocol):
    num_experts: int

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        ...


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x [n, H], w13 [2I, H] (gate rows then up rows), w2 [H, I] -> [n, H]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Order of the flattened (token, k) pairs sorted by expert, and the count per expert."""
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, counts


class ResidentExpertBank(nn.Module):
    """All experts of one layer stacked on one device: w13 [E, 2I, H], w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t, k = topk_ids.shape
        order, counts = group_by_expert(topk_ids, self.num_experts)
        token_of = order // k  # which token each sorted pair belongs to
        out = torch.zeros_like(hidden)
        weights = topk_weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start : start + n]
            y = expert_ffn(hidden[rows], self.w13[e], self.w2[e]) * weights[start : start + n, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out
