"""How many rows per expert the quant dispatch believes it has (GEMV vs GEMM), without GPU syncs."""

from __future__ import annotations

import torch

from spillover.kernels.quant_dispatch import GEMV_MAX_ROWS, SYNC_FREE_ROWS, busiest_expert_rows


def test_cpu_counts_the_busiest_expert() -> None:
    ids = torch.tensor([3, 1, 3, 3, 0, 3, 2])
    assert busiest_expert_rows(torch.zeros(7, 4), ids) == 4
    assert busiest_expert_rows(torch.zeros(7, 4), None) == 7  # dense: every row hits the one weight


def test_few_rows_need_no_count() -> None:
    ids = torch.tensor([5, 5])
    # an upper bound is enough below every threshold
    assert busiest_expert_rows(torch.zeros(2, 4), ids) == 2


def test_cuda_decode_batches_skip_the_sync() -> None:
    assert SYNC_FREE_ROWS >= 10 * 4  # batch 4 x top-10 routing stays sync-free
    if torch.cuda.is_available():
        x = torch.zeros(40, 4, device="cuda")
        ids = torch.zeros(40, dtype=torch.long, device="cuda")
        assert busiest_expert_rows(x, ids) == GEMV_MAX_ROWS


def test_prefill_chunks_skip_the_sync_too() -> None:
    """Up to 128 tokens x top-10 rows go to the GEMV without counting (measured faster there for
    int4, int8 and FP8 experts); larger batches are counted."""
    assert SYNC_FREE_ROWS >= 128 * 10
    if torch.cuda.is_available():
        ids = torch.zeros(1280, dtype=torch.long, device="cuda")
        assert busiest_expert_rows(torch.zeros(1280, 4, device="cuda"), ids) == GEMV_MAX_ROWS
        many = SYNC_FREE_ROWS + 1
        assert busiest_expert_rows(torch.zeros(many, 4, device="cuda"),
                                   # counted: one expert
                                   torch.zeros(many, dtype=torch.long, device="cuda")) == many
