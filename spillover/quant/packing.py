"""Bit packing and round-to-nearest (RTN) quantizers shared by the integer formats.

Canonical int4 layout (quantization.md §0/§7): unsigned codes q in [0, 15], two per byte along K,
low nibble = even k. Dequantization is `(q - 8) * scale` (symmetric) or `q * scale + min`
(asymmetric, float "min" per group); int8 codes are signed and use `q * scale (+ min)`.
Groups run along K (the input dimension); per-channel means one group of size K.
"""

from __future__ import annotations

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
    dequantizing the stored tensors reproduces exactly what the error was minimised for.
    """
    g = _groups(w, group_size)
    if symmetric:
        # The signed value of largest magnitude maps to code 0 (-8): one more level than absmax/7.
        idx = g.abs().argmax(dim=-1, keepdim=True)
        extreme = torch.gather(g, -1, idx)
        scale = (extreme / -8.0).to(scale_dtype).float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(g / safe) + 8, 0, 15)
        return q.to(torch.uint8).flatten(-2), scale.squeeze(-1).to(scale_dtype), None
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15.0).to(scale_dtype).float()
    mins = lo.to(scale_dtype).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((g - mins) / safe), 0, 15)
    return q.to(torch.uint8).flatten(-2), scale.squeeze(-1).to(scale_dtype), mins.squeeze(-1).to(scale_dtype)


def rtn_int8(
    w: torch.Tensor, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: (codes int8 [..., N, K], scales [..., N, K/G]); per-channel is G = K."""
    g = _groups(w, group_size)
    scale = (g.abs().amax(dim=-1, keepdim=True) / 127.0).to(scale_dtype).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(g / safe), -127, 127)
    return q.to(torch.int8).flatten(-2), scale.squeeze(-1).to(scale_dtype)
