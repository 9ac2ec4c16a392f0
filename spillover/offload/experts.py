"""The expert math, written once: every bank (resident, tiered slots, host RAM, staging) and every
format computes routed experts through `grouped_experts`.

Each (token, k) pair is one row, and each projection is one `forward_experts` call. Rows are
sorted by expert only for a kernel that wants each expert's rows contiguous (the tiled GEMM of
a long prefill chunk); a decode step's GEMVs take them in (token, k) order. Nothing here
reads a device tensor back to the host: the choice between GEMV and GEMM is the format's
(`spillover.kernels`), which answers decode-sized batches without counting rows per expert.
"""

from __future__ import annotations

from typing import Protocol

import torch

from spillover import kernels


class StackedExperts(Protocol):
    """A stacked weight format as the expert math sees it (`spillover.quant.WeightFormat`)."""

    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor,
                        sparse: bool = False) -> torch.Tensor: ...


def grouped_experts(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: StackedExperts,
    w2: StackedExperts,
    sparse: bool = False,
) -> torch.Tensor:
    """sum_k weights[t, k] * SwiGLU_{expert_ids[t, k]}(hidden[t]) -> [T, H] in hidden's dtype.

    `expert_ids` index the stacks `w13` [E, 2I, H] (gate rows, then up rows) and `w2` [E, H, I]:
    a bank that holds a subset of the experts (GPU slots, a staging buffer) passes its own indices.
    A row whose weight is 0 contributes nothing, which lets a bank mask rows without a sync.
    sparse: expert id -1 marks a row this bank does not hold; it contributes nothing, and a
    decode step's GEMVs read no weight for it (a bank whose stack sits across a link).
    """
    t, k = expert_ids.shape
    flat = expert_ids.flatten()
    if not kernels.expert_rows_sorted(hidden.device, flat.numel()):
        # rows in (token, k) order: a view of the hidden states when T is 1, no sort, no unsort
        x = hidden.unsqueeze(1).expand(t, k, hidden.shape[-1]).reshape(t * k, -1)
        gate_up = w13.forward_experts(x, flat, sparse=sparse)
        y = w2.forward_experts(kernels.silu_mul(gate_up), flat, sparse=sparse)
        return kernels.moe_sum(y.view(t, k, -1), weights)
    rows = None
    if sparse:
        # only this bank's rows are computed; counting them syncs, which only the long prefill
        # chunks that sort ever do
        rows = (flat >= 0).nonzero().squeeze(1)
        flat = flat[rows]
    order = torch.argsort(flat, stable=True)
    ids = flat[order]
    src = order if rows is None else rows[order]  # each sorted row's (token, k) position
    y = w2.forward_experts(kernels.silu_mul(w13.forward_experts(hidden[src // k], ids)), ids)
    # back to (token, k) order and summed over k in k order, rather than atomically added: the
    # same step gives the same bits every time (a CUDA graph's replay and the eager pass agree)
    out = y.new_empty if rows is None else y.new_zeros
    unsorted = out((t * k, y.shape[-1])).index_copy_(0, src, y)
    return kernels.moe_sum(unsorted.view(t, k, -1), weights)
