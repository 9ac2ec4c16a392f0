"""Format round trips, CPU decode ops vs the reference, stacked experts, and error bounds."""

from __future__ import annotations

import pytest
import torch

from spillover.kernels.quant_dispatch import choose_kernel
from spillover.kernels.ref_quant import dequant_int_ref, quant_matmul_ref
from spillover.quant import Bf16Weight, Fp8BlockWeight, Int4Weight, Int8Weight, format_from_tensors
from spillover.quant.packing import pack_int4, unpack_int4

F32 = torch.float32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def w() -> torch.Tensor:
    return torch.randn(64, 256, generator=torch.Generator().manual_seed(0))


def test_nibble_order_low_is_even_k() -> None:
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x43]]
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize(
    ("group", "sym", "bound"),
    [(128, True, 0.13), (128, False, 0.10), (32, True, 0.11), (32, False, 0.08)]
)
def test_int4_error_and_exact_codes(w: torch.Tensor, group: int, sym: bool, bound: float) -> None:
    fmt = Int4Weight.pack(w, group, sym, act_dtype=F32)
    assert fmt.qweight.shape == (1, 64, 128) and fmt.scales.shape == (1, 64, 256 // group)
    assert (fmt.mins is None) == sym
    assert rel_err(fmt.dequantize(), w) < bound
    # Re-packing the dequantized weight is a fixed point (codes were chosen against stored scales).
    again = Int4Weight.pack(fmt.dequantize(), group, sym, act_dtype=F32)
    assert rel_err(again.dequantize(), fmt.dequantize()) < 1e-3


def test_int4_symmetric_uses_full_range() -> None:
    w = torch.tensor([[-8.0] + [1.0] * 31])
    fmt = Int4Weight.pack(w, 32, True, act_dtype=F32)
    assert torch.allclose(fmt.dequantize(), w)


def test_int8_per_channel_and_group(w: torch.Tensor) -> None:
    pc = Int8Weight.pack(w, act_dtype=F32)
    assert pc.per_channel and pc.scales.shape == (1, 64, 1)
    assert rel_err(pc.dequantize(), w) < 0.01
    grp = Int8Weight.pack(w, 32, act_dtype=F32)
    assert rel_err(grp.dequantize(), w) < rel_err(pc.dequantize(), w)


def test_fp8_block_roundtrip() -> None:
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
    fmt = Fp8BlockWeight.pack(w, act_dtype=F32)
    assert fmt.weight.dtype == torch.float8_e4m3fn and fmt.scale.shape == (2, 3)
    assert rel_err(fmt.dequantize(), w) < 0.04
    x = torch.randn(3, 300)
    assert torch.allclose(fmt.forward(x), x @ fmt.dequantize().T, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda w: Int4Weight.pack(w, 128, True, act_dtype=F32),
    lambda w: Int4Weight.pack(w, 32, False, act_dtype=F32),
    lambda w: Int8Weight.pack(w, act_dtype=F32),
])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_forward_matches_reference(w: torch.Tensor, make, rows: int) -> None:  # type: ignore[no-untyped-def]
    fmt = make(w)
    x = torch.randn(rows, 256)
    ref = x @ fmt.dequantize().T
    kernel, _ = choose_kernel(fmt, x.device, rows)
    assert kernel == ("ref" if rows > 4 else f"cpu_int{fmt.bits}pack")
    assert torch.allclose(fmt.forward(x), ref, rtol=1e-4, atol=1e-4)


def test_cpu_int4_bf16_activations(w: torch.Tensor) -> None:
    fmt = Int4Weight.pack(w, 128, False, act_dtype=torch.bfloat16)
    x = torch.randn(2, 256)
    ref = x @ dequant_int_ref(fmt.qweight[0], fmt.scales[0],
                              fmt.mins[0] if fmt.mins is not None else None,
                              bits=4, group_size=128).T
    assert rel_err(fmt.forward(x.bfloat16()), ref) < 0.02


def test_group_not_supported_by_cpu_op_falls_back() -> None:
    w = torch.randn(48, 64)
    fmt = Int8Weight.pack(w, 16, act_dtype=F32)
    kernel, reason = choose_kernel(fmt, torch.device("cpu"), 1)
    assert kernel == "ref" and "per-channel" in reason
    x = torch.randn(1, 64)
    assert torch.allclose(fmt.forward(x), x @ fmt.dequantize().T, atol=1e-5)


@pytest.mark.parametrize("quant", ["int4", "int8", "bf16", "fp8"])
def test_stacked_experts_grouped_forward(quant: str) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 32, 128, generator=g)
    fmt = {
        "int4": lambda: Int4Weight.pack(w, 32, True, act_dtype=F32),
        "int8": lambda: Int8Weight.pack(w, act_dtype=F32),
        "bf16": lambda: Bf16Weight.pack(w, F32),
        "fp8": lambda: Fp8BlockWeight.pack(w, act_dtype=F32),
    }[quant]()
    assert fmt.dequantize().shape == (4, 32, 128)
    x = torch.randn(7, 128, generator=g)
    ids = torch.tensor([3, 0, 3, 1, 1, 3, 0])
    y = fmt.forward_experts(x, ids)
    for t in range(7):
        ref = x[t] @ fmt.dequantize(int(ids[t])).T
        assert torch.allclose(y[t], ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(fmt.expert_forward(x[:2], 1), x[:2] @ fmt.dequantize(1).T, atol=1e-4)


def test_tensors_roundtrip_through_registry(w: torch.Tensor) -> None:
    for fmt in (Int4Weight.pack(w, 32, False, act_dtype=F32), Int8Weight.pack(w, act_dtype=F32),
                Fp8BlockWeight.pack(w, act_dtype=F32)):
        back = format_from_tensors(fmt.tensors(), fmt.meta(), act_dtype=F32)
        assert torch.equal(back.dequantize(), fmt.dequantize())


def test_reference_dense_equals_single_expert(w: torch.Tensor) -> None:
    fmt = Int4Weight.pack(w, 128, True, act_dtype=F32)
    x = torch.randn(2, 256)
    a = quant_matmul_ref(x, fmt.qweight, fmt.scales, None, None, bits=4, group_size=128)
    b = quant_matmul_ref(x, fmt.qweight, fmt.scales, None, torch.zeros(2, dtype=torch.long), bits=4,
                         group_size=128)
    assert torch.equal(a, b)
