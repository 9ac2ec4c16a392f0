"""Triton W4A16/W8A16 GEMV and GEMM against the torch reference (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from spillover.kernels.ref_quant import quant_matmul_ref  # noqa: E402
from spillover.kernels.triton.quant_gemm import align_rows, quant_gemm  # noqa: E402
from spillover.kernels.triton.quant_gemv import quant_gemv  # noqa: E402
from spillover.quant import Int4Weight, Int8Weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # (bits, group, symmetric)
    (4, 128, True), (4, 32, False), (8, 0, True), (8, 16, True),
]


def _fmt(bits: int, group: int, sym: bool, e: int, n: int, k: int):  # type: ignore[no-untyped-def]
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(bits + group))
    if bits == 4:
        return Int4Weight.pack(w, group, sym, act_dtype=torch.float32).to(DEVICE)
    return Int8Weight.pack(w, group or None, act_dtype=torch.float32).to(DEVICE)


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
@pytest.mark.parametrize("kernel", [quant_gemv, quant_gemm])
@pytest.mark.parametrize("stacked", [False, True])
def test_kernel_matches_reference(bits: int, group: int, sym: bool, kernel, stacked: bool) -> None:  # type: ignore[no-untyped-def]
    e, n, k = (3, 40, 256) if stacked else (1, 40, 256)
    fmt = _fmt(bits, group, sym, e, n, k)
    t = 5 if kernel is quant_gemv else 19
    x = torch.randn(t, k, device=DEVICE)
    ids = torch.randint(0, e, (t,), device=DEVICE) if stacked else None
    args = (x, fmt.qweight, fmt.scales, fmt.mins, ids)
    ref = quant_matmul_ref(*args, bits=bits, group_size=fmt.group_size)
    out = kernel(*args, bits=bits, group_size=fmt.group_size)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


def test_align_rows_groups_by_expert() -> None:
    ids = torch.tensor([2, 0, 2, 2, 1])
    rows, eids = align_rows(ids, 5, 2, torch.device("cpu"))
    assert eids.tolist() == [0, 1, 2, 2]
    assert rows.tolist() == [1, 5, 4, 5, 0, 2, 3, 5]


def test_dispatch_uses_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("SPILLOVER_QUANT_KERNEL", "triton")
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    fmt = Int4Weight.pack(w, 32, True, act_dtype=torch.float32).to(DEVICE)
    x = torch.randn(2, 64, device=DEVICE)
    from spillover.quant.dispatch import choose_kernel

    assert choose_kernel(fmt, x.device, 2)[0] == "triton_gemv"
    torch.testing.assert_close(fmt.forward(x), x @ fmt.dequantize().T, rtol=1e-4, atol=1e-4)
