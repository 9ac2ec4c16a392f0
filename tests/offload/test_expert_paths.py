"""`grouped_experts`'s two row orders (sorted by expert for a tiled GEMM, or (token, k) order for
GEMVs) and its sparse rows (expert -1: a row another tier serves) compute the same sums."""

from __future__ import annotations

import pytest
import torch

from spillover import kernels
from spillover.offload import experts
from spillover.quant.bf16 import Bf16Weight


def _bank(e: int = 6, h: int = 16, i: int = 8) -> tuple[Bf16Weight, Bf16Weight]:
    g = torch.Generator().manual_seed(0)
    return (Bf16Weight(torch.randn(e, 2 * i, h, generator=g), stacked=True),
            Bf16Weight(torch.randn(e, h, i, generator=g), stacked=True))


@pytest.mark.parametrize("sorted_rows", [False, True])
def test_sparse_rows_equal_masked_weights(sorted_rows: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "expert_rows_sorted", lambda device, rows: sorted_rows)
    w13, w2 = _bank()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 16, generator=g)
    ids = torch.randint(0, 6, (5, 3), generator=g)
    ids[0, 1] = ids[3, 0] = ids[3, 2] = -1
    weights = torch.rand(5, 3, generator=g)
    live = ids >= 0
    want = experts.grouped_experts(hidden, ids.clamp(min=0), weights * live, w13, w2)
    got = experts.grouped_experts(hidden, ids, weights, w13, w2, sparse=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_both_row_orders_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    w13, w2 = _bank()
    g = torch.Generator().manual_seed(2)
    hidden, ids = torch.randn(7, 16, generator=g), torch.randint(0, 6, (7, 2), generator=g)
    weights = torch.rand(7, 2, generator=g)
    got = {}
    for sorted_rows in (False, True):
        monkeypatch.setattr(kernels, "expert_rows_sorted",
                            lambda device, rows, answer=sorted_rows: answer)
        got[sorted_rows] = experts.grouped_experts(hidden, ids, weights, w13, w2)
    torch.testing.assert_close(got[True], got[False], rtol=1e-6, atol=1e-6)
