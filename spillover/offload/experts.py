"""The expert math, written once: every bank (resident, tiered slots, host RAM, staging) and every
format computes routed experts through `grouped_experts`.

Each (token, k) pair is one row; rows are sorted by expert so that a format's grouped kernel sees
each expert's rows contiguous, and each projection is one `forward_experts` call. Nothing here
reads a device tensor back to the host: the choice between GEMV and GEMM is the format's
(`spillover.kernels`), which answers decode-sized batches without counting rows per expert.
"""

from __future__ import annotations

from typing import Protocol

import torch

from spillover import kernels


class StackedExperts(Protocol):
    """A stacked weight format as the expert math sees it (`spillover.quant.WeightFormat`)."""

    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor: ...


def grouped_experts(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: StackedExperts,
    w2: StackedExperts,
) -> torch.Tensor:
    """sum_k weights[t, k] * SwiGLU_{expert_ids[t, k]}(hidden[t]) -> [T, H] in hidden's dtype.

    `expert_ids` index the stacks `w13` [E, 2I, H] (gate rows, then up rows) and `w2` [E, H, I]:
    a bank that holds a subset of the experts (GPU slots, a staging buffer) passes its own indices.
    A row whose weight is 0 contributes nothing, which lets a bank mask rows without a sync.
    """
    k = expert_ids.shape[1]
    flat = expert_ids.flatten()
    order = torch.argsort(flat, stable=True)
    ids = flat[order]
    token_of = order // k
    gate_up = w13.forward_experts(hidden[token_of], ids)
    y = w2.forward_experts(kernels.silu_mul(gate_up), ids)
    y = y * weights.flatten()[order, None].to(y.dtype)
    # Back to (token, k) order and summed over k, rather than atomically added: the same step
    # gives the same bits every time (a CUDA graph's replay and the eager pass agree).
    unsorted = torch.empty_like(y).index_copy_(0, order, y)
    return unsorted.view(-1, k, y.shape[-1]).sum(1, dtype=torch.float32).to(hidden.dtype)
