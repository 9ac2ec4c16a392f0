"""Bit packing and round-to-nearest (RTN) quantizers shared by the integer formats.

Canonical int4 layout (docs/quantization.md, "2. Layouts"): unsigned codes q in [0, 15],
two per byte along K, low nibble = even k. Dequantization is `(q - 8) * scale`
(symmetric) or `q * scale + min` (asymmetric, float "min" per group); int8 codes are
signed and use `q * scale (+ min)`. Groups run along K (the input dimension); per-channel
means one group of size K.
"""

from __future__ import annotations

import math
import sys

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes in [0, 15] -> [..., K/2] uint8, even k in the low nibble."""
    assert codes.shape[-1] % 2 == 0, "int4 packing needs an even K"
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] uint8 codes in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    k = w.shape[-1]
    if k % group_size != 0:
        raise ValueError(f"in_features {k} is not a multiple of group size {group_size}")
    return w.float().reshape(*w.shape[:-1], k // group_size, group_size)


def rtn_int4(
    w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize [..., N, K] to (codes uint8 [..., N, K], scales [..., N, K/G], mins or None).

    Codes are computed against the scales (and mins) *after* rounding them to `scale_dtype`, so
    dequantizing the stored tensors reproduces exactly what the error was minimised for. Scales are
    a multiply by a float32 reciprocal, not a division: CUDA divides by a scalar that way, so
    packing on the GPU (quantize-at-load) gives the same bytes as on the CPU.
    """
    g = _groups(w, group_size)
    if symmetric:
        # The signed value of largest magnitude maps to code 0 (-8): one more level than absmax/7.
        idx = g.abs().argmax(dim=-1, keepdim=True)
        extreme = torch.gather(g, -1, idx)
        scale = (extreme * (-1.0 / 8.0)).to(scale_dtype).float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(g / safe) + 8, 0, 15)
        return q.to(torch.uint8).flatten(-2), scale.squeeze(-1).to(scale_dtype), None
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) * (1.0 / 15.0)).to(scale_dtype).float()
    mins = lo.to(scale_dtype).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((g - mins) / safe), 0, 15)
    codes = q.to(torch.uint8).flatten(-2)
    return codes, scale.squeeze(-1).to(scale_dtype), mins.squeeze(-1).to(scale_dtype)


def rtn_int8(
    w: torch.Tensor, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: (codes int8 [..., N, K], scales [..., N, K/G]); per-channel is G = K."""
    g = _groups(w, group_size)
    scale = (g.abs().amax(dim=-1, keepdim=True) * (1.0 / 127.0)).to(scale_dtype).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(g / safe), -127, 127)
    return q.to(torch.int8).flatten(-2), scale.squeeze(-1).to(scale_dtype)


# ---- chunked packing ----------------------------------------------------------------------------
# Whole-tensor RTN allocates several float32 copies of the tensor at once, and each fresh multi-MB
# allocation costs page faults. Rows are independent (groups run along K), so packing a few MB of
# rows at a time through reused scratch gives the same codes with bounded temporaries, and the
# in-place ops on cache-sized chunks run faster (`python bench/convert_rss.py --gb 3`;
# docs/kernel_notes.md, "Converter speed and peak RSS").

# float32 elements per chunk (4 MB): fewer per-op dispatches beat L2 residency here
CHUNK_ELEMS = 1 << 20
# Adding 1.5 * 2**23 to a float32 |y| < 2**22 rounds it to an integer exactly as round() does
# (half to even), and that integer then sits in the low bits of the float's bit pattern: one add
# replaces round + offset, and the codes come out by truncating int32 bits instead of a slow
# float->uint8 cast.
_MAGIC = 12582912.0
_LITTLE_ENDIAN = sys.byteorder == "little"  # the int16/int32 views below read low bytes first


class RowPacker:
    """RTN int4 / int8 over chunks of rows, bit-identical to `rtn_int4` + `pack_int4` / `rtn_int8`.

    Parts per row block of a [R, K] weight: int4 `qweight` uint8 [R, K/2]; int8 `qweight` int8
    [R, K]; `scales` [R, K/G] in `scale_dtype`; int4 asymmetric also `mins`. Holds reusable scratch,
    so use one instance per thread.
    """

    def __init__(self, bits: int, group_size: int, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.float16, chunk_elems: int = CHUNK_ELEMS) -> None:
        assert bits in (4, 8)
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        self.symmetric = symmetric or bits == 8  # int8 is symmetric only
        self.chunk_elems = chunk_elems
        self._bufs: dict[str, torch.Tensor] = {}

    def part_dtypes(self, k: int) -> dict[str, tuple[torch.dtype, int]]:
        """{part: (dtype, columns)} for rows of K inputs."""
        code = (torch.uint8, k // 2) if self.bits == 4 else (torch.int8, k)
        parts = {"qweight": code, "scales": (self.scale_dtype, k // self.group_size)}
        if not self.symmetric:
            parts["mins"] = (self.scale_dtype, k // self.group_size)
        return parts

    def rows_per_chunk(self, k: int) -> int:
        return max(1, self.chunk_elems // max(1, k))

    def _buf(self, name: str, shape: tuple[int, int], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        b = self._bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            b = self._bufs[name] = torch.empty(max(n, self.chunk_elems), dtype=dtype, device=device)
        return b[:n].view(shape)

    def scratch(self, rows: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A float32 [rows, k] buffer reused across chunks (and tensors) to avoid fresh
        allocations."""
        return self._buf("x", (rows, k), torch.float32, torch.device(device))

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Whole [..., K] weight -> parts shaped [R, cols] (R = rows of all leading dims)."""
        k = weight.shape[-1]
        w2 = weight.detach().reshape(-1, k)
        rows = w2.shape[0]
        out = {n: torch.empty(rows, c, dtype=dt, device=w2.device)
               for n, (dt, c) in self.part_dtypes(k).items()}
        step = self.rows_per_chunk(k)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = self.scratch(r1 - r0, k, w2.device).copy_(w2[r0:r1])
            self.pack_into(x, {n: t[r0:r1] for n, t in out.items()})
        return out

    def pack_into(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        """Quantize float32 rows `x` [R, K] (clobbered) into the `out` part views [R, cols]."""
        r, k = x.shape
        if k % self.group_size != 0:
            raise ValueError(f"in_features {k} is not a multiple of group size {self.group_size}")
        g = x.view(r, k // self.group_size, self.group_size)
        # NOTE: a chunk is only ~20 ops on the whole data, but each small op pays a fixed dispatch
        # cost; the scale math below is written with as few of them as exactness allows.
        hi, lo = g.amax(dim=-1, keepdim=True), g.amin(dim=-1, keepdim=True)
        mins = None
        if self.bits == 8:
            # max |x| without an abs() pass; `+ 0.0` turns an all-zero group's -0.0
            # into abs()'s +0.0.
            scale = torch.maximum(hi, lo.neg_()).add_(0.0).mul_(1.0 / 127.0).to(self.scale_dtype)
        elif self.symmetric:
            scale = _signed_extreme(g, hi, lo).mul_(-1.0 / 8.0).to(self.scale_dtype)
        else:
            scale = (hi - lo).mul_(1.0 / 15.0).to(self.scale_dtype)
            mins = lo.to(self.scale_dtype)
        # Non-finite scales (NaN/inf weights, float16 overflow) make a sum that is not finite; those
        # chunks take the reference path (x is untouched so far): casts of NaN are not ours to
        # reorder.
        check = scale.sum(dtype=torch.float32)
        if mins is not None:
            check = check + mins.sum(dtype=torch.float32)
        if not (math.isfinite(float(check)) and _LITTLE_ENDIAN):
            self._reference_into(x, out)
            return
        # Dividing by float16 `safe` divides by its exact float32 value, as the reference does.
        safe = torch.where(scale == 0, 1.0, scale)
        # Finite scales bound every quotient, so clamping before rounding equals the reference's
        # round-then-clamp (the bounds are integers) and keeps |y| far below 2**22 for _MAGIC.
        bits = x.view(torch.int32)
        if self.bits == 8:
            g.div_(safe).clamp_(-127, 127).add_(_MAGIC)
            # int32 -> int8 keeps the low byte: the two's-complement code
            out["qweight"].copy_(bits)
        else:
            if mins is not None:
                g.sub_(mins).div_(safe).clamp_(0, 15).add_(_MAGIC)
                out["mins"].copy_(mins.squeeze(-1))
            else:  # reference: clamp(round(y) + 8, 0, 15); 8 is even, so rounding y + 8 is the same
                g.div_(safe).clamp_(-8, 7).add_(_MAGIC + 8)
            codes = self._buf("codes", (r, k), torch.uint8, x.device).copy_(bits)  # low byte = code
            pairs = codes.view(torch.int16)  # even k in the low byte, odd k in the high byte
            packed = self._buf("pairs", (r, k // 2), torch.int16, x.device)
            torch.bitwise_right_shift(pairs, 4, out=packed).bitwise_or_(pairs)
            out["qweight"].copy_(packed)  # low byte: even | odd << 4
        out["scales"].copy_(scale.squeeze(-1))

    def _reference_into(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        if self.bits == 8:
            codes, scales = rtn_int8(x, self.group_size, self.scale_dtype)
            out["qweight"].copy_(codes)
        else:
            codes, scales, mins = rtn_int4(x, self.group_size, self.symmetric, self.scale_dtype)
            out["qweight"].copy_(pack_int4(codes))
            if mins is not None:
                out["mins"].copy_(mins)
        out["scales"].copy_(scales)


def _signed_extreme(g: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Per group, the value of the first element of largest magnitude (what abs().argmax() picks).

    The sign of hi + lo says which of max/min is larger in magnitude (a float sum is 0 only when
    exact); only groups where +m and -m both occur (rare) pay for argmax, which is much slower than
    amax on the CPU. NaN/inf groups may come out wrong here: their scale is not finite, so the
    caller takes the reference path for them.
    """
    d = hi + lo
    extreme = torch.where(d > 0, hi, lo)
    idx = (d == 0).squeeze(-1).nonzero(as_tuple=True)
    if idx[0].numel():
        sub = g[idx]  # [ties, G]
        extreme[idx] = torch.gather(sub, -1, sub.abs().argmax(dim=-1, keepdim=True))
    return extreme
