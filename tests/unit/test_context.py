"""ForwardContext's per-step linear-attention metadata is built once and is right."""

from __future__ import annotations

import torch

from spillover.kernels.context import ForwardContext


def test_linear_meta_built_once() -> None:
    ctx = ForwardContext(positions=torch.zeros(9, dtype=torch.long), query_lens=[4, 1, 4], context_lens=[4, 8, 6],
                         state_slots=[3, 0, 5])
    slots, fresh, cu = ctx.linear_meta(torch.device("cpu"))
    assert slots.tolist() == [3, 0, 5]
    assert fresh.tolist() == [True, False, False]  # cached lens 0, 7, 2
    assert cu.tolist() == [0, 4, 5, 9]
    assert ctx.linear_meta(torch.device("cpu"))[0] is slots  # every layer reuses the step's tensors
