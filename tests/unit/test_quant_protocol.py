"""Every format is a `WeightFormat`, and its own `concat` / `take_rows` / `to` keep its bytes.

Rows and experts are independent in every format's packing (int groups run along K; FP8 blocks
are whole when the parts are multiples of the block), so packing parts and joining them must give
the tensors of packing the whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from spillover.quant import (
    FORMATS,
    Bf16Weight,
    Fp8BlockWeight,
    Int4Weight,
    Int8Weight,
    WeightFormat,
    concat_experts,
    format_from_tensors,
)

PACKERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "bf16": lambda w: Bf16Weight.pack(w, torch.float32),
    "int4-sym": lambda w: Int4Weight.pack(w, 32, True, act_dtype=torch.float32),
    "int4-asym": lambda w: Int4Weight.pack(w, 32, False, act_dtype=torch.float32),
    "int8": lambda w: Int8Weight.pack(w, act_dtype=torch.float32),
    "int8-g32": lambda w: Int8Weight.pack(w, 32, act_dtype=torch.float32),
    "fp8_block": lambda w: Fp8BlockWeight.pack(w, act_dtype=torch.float32),
}
E, N, K = 3, 256, 128  # N a multiple of the FP8 block, so row parts of 128 keep blocks whole


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b) and a.meta() == b.meta()
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for k in ta:  # as bytes: torch.equal has no FP8 kernel on the CPU
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        a, b = (t.contiguous().view(torch.uint8) for t in (ta[k], tb[k]))
        assert torch.equal(a, b)


def test_every_format_class_is_registered() -> None:
    assert set(FORMATS.values()) == {Bf16Weight, Int4Weight, Int8Weight, Fp8BlockWeight}


@pytest.mark.parametrize("kind", PACKERS)
@pytest.mark.parametrize("stacked", [False, True], ids=["dense", "stacked"])
def test_is_a_weight_format(kind: str, stacked: bool) -> None:
    w = torch.randn(E, N, K) if stacked else torch.randn(N, K)
    fmt = PACKERS[kind](w)
    assert isinstance(fmt, WeightFormat)
    assert fmt.stacked == stacked and fmt.num_experts == (E if stacked else 1)
    assert (fmt.out_features, fmt.in_features) == (N, K)
    assert fmt.nbytes == sum(t.numel() * t.element_size() for t in fmt.tensors().values())
    _same(type(fmt).from_tensors(fmt.tensors(), fmt.meta(), fmt.act_dtype), fmt)
    _same(format_from_tensors(fmt.tensors(), fmt.meta(), fmt.act_dtype), fmt)
    moved = fmt.to("meta")
    assert type(moved) is type(fmt) and moved.meta() == fmt.meta() and moved.nbytes == fmt.nbytes
    assert all(t.is_meta for t in moved.tensors().values())


@pytest.mark.parametrize("kind", PACKERS)
@pytest.mark.parametrize("stacked", [False, True], ids=["dense", "stacked"])
def test_concat_rows_round_trips(kind: str, stacked: bool) -> None:
    """q|k|v and gate|up: parts packed on their own, joined along the output rows."""
    w = torch.randn(E, N, K) if stacked else torch.randn(N, K)
    whole = PACKERS[kind](w)
    sizes = [128, 128] if kind == "fp8_block" else [128, 64, 64]  # FP8: whole 128-row blocks
    parts = [PACKERS[kind](p) for p in w.split(sizes, dim=-2)]
    joined = type(whole).concat(parts, 1)
    assert joined is not None
    _same(joined, whole)
    assert joined.nbytes == sum(p.nbytes for p in parts)


@pytest.mark.parametrize("kind", PACKERS)
def test_concat_experts_round_trips(kind: str) -> None:
    """Per-expert checkpoint tensors: dense parts stacked, or stacks joined, along experts."""
    w = torch.randn(E, N, K)
    whole = PACKERS[kind](w)
    per = [PACKERS[kind](w[e]) for e in range(E)]
    stacked = type(whole).concat(per, 0)
    assert stacked is not None and stacked.stacked
    _same(stacked, whole)
    halves = [PACKERS[kind](w[:1]), PACKERS[kind](w[1:])]
    joined = type(whole).concat(halves, 0)
    assert joined is not None
    _same(joined, whole)
    # each expert's rows (gate, up) then the experts: one call, the same stack
    rows = [[PACKERS[kind](p) for p in w[e].split(128, dim=0)] for e in range(E)]
    from_rows = concat_experts(rows)
    assert from_rows is not None
    _same(from_rows, whole)


def test_concat_refuses_parts_that_cannot_share_a_kernel_call() -> None:
    w = torch.randn(N, K)
    def int4(group: int, symmetric: bool) -> Int4Weight:
        return Int4Weight.pack(w, group, symmetric, act_dtype=torch.float32)

    assert Int4Weight.concat([int4(32, True), int4(64, True)], 1) is None  # groups differ
    assert Int4Weight.concat([int4(32, True), int4(32, False)], 1) is None  # mins or not
    int8 = Int8Weight.pack(w, act_dtype=torch.float32)
    assert Int4Weight.concat([int4(32, True), int8], 1) is None  # another format
    fp8 = [Fp8BlockWeight.pack(p, act_dtype=torch.float32) for p in w.split([96, 160])]
    assert Fp8BlockWeight.concat(fp8, 1) is None  # the first part ends inside a 128-row block
    bf16 = [Bf16Weight.pack(w, torch.float32), Bf16Weight.pack(w, torch.bfloat16)]
    assert Bf16Weight.concat(bf16, 1) is None


def test_int_parts_in_gpu_layout_join_in_storage_layout() -> None:
    w = torch.randn(N, K)
    whole = Int4Weight.pack(w, 32, False, act_dtype=torch.float32)
    parts = [Int4Weight.pack(p, 32, False, act_dtype=torch.float32) for p in w.split(128)]
    parts = [p.to_layout("kn") for p in parts]
    joined = Int4Weight.concat(parts, 1)
    assert joined is not None and joined.layout == "nk"
    _same(joined, whole)


@pytest.mark.parametrize("kind", PACKERS)
def test_take_rows_moves_scales_with_their_row(kind: str) -> None:
    w = torch.randn(N, K)
    fmt = PACKERS[kind](w)
    perm = torch.randperm(N)
    moved = fmt.take_rows(perm)
    if kind == "fp8_block":  # a scale covers 128 rows: the caller permutes the dequantized weight
        assert moved is None
        return
    assert moved is not None
    assert torch.equal(moved.dequantize(), fmt.dequantize()[perm])


def test_fp8_per_row_scales_take_rows() -> None:
    w = torch.randn(N, K)
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    fmt = Fp8BlockWeight((w / scale).to(torch.float8_e4m3fn), scale, (1, K), torch.float32)
    perm = torch.randperm(N)
    moved = fmt.take_rows(perm)
    assert moved is not None and torch.equal(moved.dequantize(), fmt.dequantize()[perm])
