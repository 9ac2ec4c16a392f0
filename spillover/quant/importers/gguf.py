"""GGUF block formats -> our integer formats, losslessly (docs/quantization.md, "1. What we load").

Q4_0 -> int4 sym G32; Q4_1 -> int4 G32 with mins m; Q4_K -> int4 G32 with scale d*sc, min -dmin*m;
Q8_0 -> int8 G32; Q5_K -> int8 G32 codes 0..31 with mins; Q6_K -> int8 G16 codes q-32, scale d*sc.
Every import dequantizes bit-identically to `gguf.quants.dequantize` (tested). GGUF stores rows
along K (ne0) in blocks; `data` is the reader's uint8 view [..., N, bytes_per_row].
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from spillover.quant.grouped import GroupedIntWeight
from spillover.quant.int4 import Int4Weight
from spillover.quant.int8 import Int8Weight
from spillover.quant.packing import pack_int4

Q = GGMLQuantizationType
SUPPORTED = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float32 (little-endian f16)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles_halves(qs: torch.Tensor) -> torch.Tensor:
    """[B, 16] bytes -> [B, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat((qs & 15, qs >> 4), dim=-1)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12 packed bytes [B, 12] -> six-bit scales and mins [B, 8] (float32)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 63, (c & 15) | ((a >> 6) << 4)), dim=-1)
    mn = torch.cat((b & 63, (c >> 4) | ((b >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[B, 128] -> [B, 256]: in each 64-value chunk, low nibbles of 32 bytes then the high ones."""
    q = qs.view(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    return (q & 15).reshape(-1, 256)


def _decode(blocks: torch.Tensor,
            qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """blocks [B, type_size] uint8 -> (codes [B, block] int, scales [B, n_groups],
    mins | None, group)."""
    if qtype in (Q.Q4_0, Q.Q4_1):
        off = 2 if qtype == Q.Q4_0 else 4
        mins = _f16(blocks[:, 2:4].reshape(-1, 1, 2)) if qtype == Q.Q4_1 else None
        return _nibbles_halves(blocks[:, off:]), _f16(blocks[:, 0:2].reshape(-1, 1, 2)), mins, 32
    if qtype == Q.Q8_0:
        codes = blocks[:, 2:].contiguous().view(torch.int8)
        return codes, _f16(blocks[:, 0:2].reshape(-1, 1, 2)), None, 32
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(blocks[:, 0:2].reshape(-1, 1, 2)), _f16(blocks[:, 2:4].reshape(-1, 1, 2))
        sc, mn = _k_scale_min(blocks[:, 4:16])
        if qtype == Q.Q4_K:
            codes = _k_low_nibbles(blocks[:, 16:144])
        else:
            low = _k_low_nibbles(blocks[:, 48:176])
            shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
            qh = blocks[:, 16:48].reshape(-1, 1, 32) >> shifts
            codes = (low | ((qh & 1) << 4).reshape(-1, 256)).to(torch.int8)
        return codes, d * sc, -(dmin * mn), 32
    if qtype == Q.Q6_K:
        ql, qh = blocks[:, 0:128], blocks[:, 128:192]
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = _f16(blocks[:, 208:210].reshape(-1, 1, 2))
        lo_shifts = torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
        hi_shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        lo = (ql.reshape(-1, 2, 1, 64) >> lo_shifts) & 15
        hi = (qh.reshape(-1, 2, 1, 32) >> hi_shifts) & 3
        q = lo.reshape(-1, 256).to(torch.int16) | (hi.reshape(-1, 256).to(torch.int16) << 4)
        return (q - 32).to(torch.int8), d * sc, None, 16
    raise NotImplementedError(f"GGUF type {qtype.name} has no lossless import; supported: "
                              f"{', '.join(t.name for t in SUPPORTED)}")


def import_gguf(data: np.ndarray | torch.Tensor, qtype: Q, in_features: int,
                act_dtype: torch.dtype = torch.bfloat16) -> GroupedIntWeight:
    """Repack GGUF blocks [..., N, bytes_per_row] (2-D dense or 3-D stacked experts)."""
    raw = torch.as_tensor(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    lead = tuple(raw.shape[:-1])
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert raw.shape[-1] == in_features // block * type_size, "row bytes do not match in_features"
    codes, scales, mins, group = _decode(raw.reshape(-1, type_size), qtype)
    shape = (*lead, in_features)
    gshape = (*lead, in_features // group)
    codes = codes.reshape(shape)
    scales = scales.reshape(gshape)
    mins = mins.reshape(gshape) if mins is not None else None
    stacked = len(lead) == 2  # [E, N, bytes] -> stacked experts
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):  # f16 in the file: keep f16 (exact, half the bytes)
        scales = scales.half()
        mins = mins.half() if mins is not None else None
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K):
        return Int4Weight(pack_int4(codes.to(torch.uint8)), scales, mins, group_size=group,
                          stacked=stacked, act_dtype=act_dtype)
    return Int8Weight(codes.to(torch.int8), scales, mins, group_size=group, stacked=stacked,
                      act_dtype=act_dtype)
