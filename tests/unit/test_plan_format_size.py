"""The planner's byte model (`plan.formats.FormatSize`) equals what each packed format holds
(`WeightFormat.nbytes`), byte for byte, dense and stacked, at shapes that do and do not fill a
whole group or block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from spillover.plan.formats import BF16, FP8, INT4, INT4_ZP, INT8, FormatSize
from spillover.quant import Fp8BlockWeight, Int4Weight, pack_weight

SHAPES = [(256, 512), (384, 128), (4, 128, 256)]  # [N, K] and stacked [E, N, K]
ODD_SHAPES = [(200, 300), (3, 130, 260)]  # FP8 and bf16: partial blocks at the edges


def _fp8_per_row(w: torch.Tensor) -> Fp8BlockWeight:
    """FP8_DYNAMIC as imported: one float32 scale per output row (block 1 x K)."""
    scale = w.abs().amax(dim=-1, keepdim=True) / 448.0
    return Fp8BlockWeight((w / scale).to(torch.float8_e4m3fn), scale, (1, w.shape[-1]))


def _int4_float32_mins(w: torch.Tensor, group: int) -> Int4Weight:
    """An imported asymmetric int4 (AWQ, GPTQ with zeros): float16 scales, float32 mins."""
    f = Int4Weight.pack(w, group, False)
    assert f.mins is not None
    return Int4Weight(f.qweight, f.scales, f.mins.float(), group_size=group, stacked=f.stacked)


CASES: dict[str, tuple[FormatSize, Callable[[torch.Tensor], Any]]] = {
    "bf16": (BF16, lambda w: pack_weight(w, "bf16")),
    "int4-sym-g128": (INT4, lambda w: pack_weight(w, "int4", 128, True)),
    "int4-asym-g128": (INT4_ZP, lambda w: pack_weight(w, "int4", 128, False)),
    "int4-sym-g32": (FormatSize("int4", "", 3, group_size=32),
                     lambda w: pack_weight(w, "int4", 32, True)),
    "int4-asym-g32": (FormatSize("int4", "", 3, group_size=32, zero_point=True),
                      lambda w: pack_weight(w, "int4", 32, False)),
    "int4-asym-f32-mins": (FormatSize("int4", "", 3, group_size=64, zero_point=True, zero_bytes=4),
                           lambda w: _int4_float32_mins(w, 64)),
    "int8": (INT8, lambda w: pack_weight(w, "int8")),
    "fp8-block": (FP8, lambda w: pack_weight(w, "fp8_block")),
    "fp8-per-row": (FormatSize("fp8", "", 1, group_size=0), _fp8_per_row),
}
BLOCKWISE = ("bf16", "fp8-block", "fp8-per-row")  # no group along K to fill
PARAMS = [(c, s) for c in CASES for s in SHAPES + (ODD_SHAPES if c in BLOCKWISE else [])]
IDS = [f"{c}-{'x'.join(map(str, s))}" for c, s in PARAMS]


@pytest.mark.parametrize(("case", "shape"), PARAMS, ids=IDS)
def test_format_size_is_the_packed_nbytes(case: str, shape: tuple[int, ...]) -> None:
    size, pack = CASES[case]
    fmt = pack(torch.randn(shape))
    assert fmt.stacked == (len(shape) == 3)
    assert size.nbytes(shape) == fmt.nbytes, (case, shape)
    if len(shape) == 2:
        assert size.matrix_bytes(*shape) == fmt.nbytes


def test_every_planner_format_is_covered() -> None:
    from spillover.plan.formats import FORMATS

    assert set(FORMATS.values()) <= {size for size, _ in CASES.values()}
