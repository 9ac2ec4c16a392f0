"""Chunked packing (RowPacker, the formats' pack(), the converter's streaming path) is bit-identical
to packing the whole tensor at once with the reference RTN
(`rtn_int4` / `rtn_int8` / FP8 blocks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spillover.quant import Fp8BlockWeight, Int4Weight, Int8Weight
from spillover.quant.fp8 import FP8_MAX
from spillover.quant.packing import RowPacker, pack_int4, rtn_int4, rtn_int8


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so that NaN payloads and signed zeros count too."""
    return t.contiguous().view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _int4_whole(w: torch.Tensor, group: int, sym: bool) -> dict[str, torch.Tensor]:
    codes, scales, mins = rtn_int4(w, group, sym, torch.float16)
    out = {"qweight": pack_int4(codes), "scales": scales}
    if mins is not None:
        out["mins"] = mins
    return out


def _int8_whole(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    codes, scales = rtn_int8(w, group, torch.float16)
    return {"qweight": codes, "scales": scales}


def _fp8_whole(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-tensor FP8 block quantizer as it was before chunking."""
    n, k = weight.shape[-2:]
    w = F.pad(weight.float(), (0, -k % block, 0, -n % block))
    tiles = w.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))
    # as Fp8BlockWeight.pack: CUDA-identical
    scale = tiles.abs().amax(dim=(-3, -1)) * (1.0 / FP8_MAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    s_full = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)
    q = (w / s_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q[..., :n, :k].contiguous(), scale


def _weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 normals plus groups full of exact +-m ties, zeros and -0.0 (where shortcuts break)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).bfloat16()
    flat = w.view(-1, shape[-1])
    flat[0, :32] = 0.0
    flat[0, 32:64] = -0.0
    if flat.shape[0] > 2:
        flat[1] = torch.randint(-4, 5, (shape[-1],), generator=g).bfloat16() / 2  # many exact ties
        pairs = 2 * (shape[-1] // 2)
        flat[2, 1:pairs:2] = -flat[2, 0:pairs:2]
    if flat.shape[0] > 5 and shape[-1] % 32 == 0:
        # Quotients exactly halfway between codes (scale 1): rounding must be
        # half-to-even everywhere.
        halves = torch.arange(shape[-1]) % 16 - 7.5  # -7.5 .. 7.5
        flat[3] = halves
        flat[3, 0::32] = -8.0  # int4 symmetric: scale = -8 / -8 = 1
        flat[4] = halves * 15  # -112.5 .. 112.5
        flat[4, 0::32] = 127.0  # int8: scale = 127 / 127 = 1
        flat[5] = (halves + 8).clamp(max=14.5)  # 0.5 .. 14.5
        flat[5, 0::32], flat[5, 1::32] = 0.0, 15.0  # int4 asymmetric: min 0, scale 15 / 15 = 1
    return w


SHAPES = [(37, 256), (3, 29, 256), (300, 128)]  # rows never a multiple of the chunk below


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("group", "sym"), [(32, True), (32, False), (128, True), (128, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_chunks_equal_whole(shape: tuple[int, ...], group: int, sym: bool,
                                 dtype: torch.dtype) -> None:
    w = _weights(shape, 0).to(dtype)
    ref = _int4_whole(w.reshape(-1, shape[-1]), group, sym)
    got = RowPacker(4, group, sym, chunk_elems=7 * shape[-1]).pack(w)
    assert set(got) == set(ref)
    for part in ref:
        assert _same(got[part], ref[part]), part
    fmt = Int4Weight.pack(w, group, sym)
    ref_parts = {n: t.reshape(fmt.qweight.shape[0], -1, t.shape[-1]) for n, t in ref.items()}
    assert _same(fmt.qweight, ref_parts["qweight"]) and _same(fmt.scales, ref_parts["scales"])
    assert (fmt.mins is None) == sym and (sym or _same(fmt.mins, ref_parts["mins"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [None, 32])
def test_int8_chunks_equal_whole(shape: tuple[int, ...], group: int | None) -> None:
    w = _weights(shape, 1)
    g = group or shape[-1]
    ref = _int8_whole(w.reshape(-1, shape[-1]), g)
    got = RowPacker(8, g, chunk_elems=5 * shape[-1]).pack(w)
    assert set(got) == {"qweight", "scales"}
    for part in ref:
        assert _same(got[part], ref[part]), part
    fmt = Int8Weight.pack(w, group)
    assert _same(fmt.qweight.reshape(-1, shape[-1]), ref["qweight"])
    assert _same(fmt.scales.reshape(ref["scales"].shape), ref["scales"])


@pytest.mark.parametrize("bits", [4, 8])
def test_nonfinite_rows_take_the_reference_path(bits: int) -> None:
    w = _weights((40, 128), 2).float()
    w[3, 5] = float("nan")
    w[17, 100] = float("inf")
    w[30, 0] = 1e6  # overflows a float16 scale
    ref = _int4_whole(w, 32, False) if bits == 4 else _int8_whole(w, 32)
    got = RowPacker(bits, 32, False, chunk_elems=9 * 128).pack(w)
    for part in ref:
        assert _same(got[part], ref[part]), part


@pytest.mark.parametrize("shape", [(200, 300), (2, 130, 256), (129, 64), (3, 1, 5)])
def test_fp8_block_bands_equal_whole(shape: tuple[int, ...],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import spillover.quant.fp8 as fp8

    monkeypatch.setattr(fp8, "CHUNK_ELEMS", 1)  # one 128-row block per band: many bands
    w = _weights(shape, 3)
    q, s = _fp8_whole(w)
    fmt = Fp8BlockWeight.pack(w)
    assert _same(fmt.weight, q) and _same(fmt.scale, s)
    monkeypatch.setattr(fp8, "CHUNK_ELEMS", 1 << 20)
    fmt = Fp8BlockWeight.pack(w)
    assert _same(fmt.weight, q) and _same(fmt.scale, s)
