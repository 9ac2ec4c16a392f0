"""Triton per-head q/k RMSNorm and rotary embedding (NeoX rotate-half, partial or whole head) in
one kernel, for attention's queries and keys together.

Same signature as `spillover.kernels.ref.qk_norm_rope`. One program takes one head of one token:
it normalises the row (held whole in registers), rounds it to the activations' dtype as the
reference's norm does, then rotates the first RD dims in fp32 and rounds once. The partner of
dim d in the rotation (d ± RD/2) is read as a second load of the same row, normalised with the
same statistics. The grid comes from shapes alone, so a CUDA graph can capture the launch.
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_row(src, dst, w_ptr, cos_row, sin_row, eps, offset,
                   D: tl.constexpr, D_P: tl.constexpr, RD: tl.constexpr,
                   HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr):
    d = tl.arange(0, D_P)
    ok = d < D
    half = RD // 2
    rot = d < RD
    partner = tl.where(d < half, d + half, d - half)
    x = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=rot, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            y = x * rstd * (offset + w)
            yp = xp * rstd * (offset + wp)
        else:
            y = (x * rstd).to(dst.dtype.element_ty).to(tl.float32) * w
            yp = (xp * rstd).to(dst.dtype.element_ty).to(tl.float32) * wp
        y = y.to(dst.dtype.element_ty).to(tl.float32)
        yp = yp.to(dst.dtype.element_ty).to(tl.float32)
    else:
        y = x
        yp = xp
    c = tl.load(cos_row + d, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(sin_row + d, mask=rot, other=0.0).to(tl.float32)
    sign = tl.where(d < half, -1.0, 1.0)
    out = tl.where(rot, y * c + sign * yp * s, y)
    tl.store(dst + d, out.to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    eps, offset,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, RD: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cos_row = cos_ptr + t * stride_ct
    sin_row = sin_ptr + t * stride_st
    if h < HQ:
        _norm_rope_row(q_ptr + t * stride_qt + h * stride_qh, qo_ptr + (t * HQ + h) * D, qw_ptr,
                       cos_row, sin_row, eps, offset, D, D_P, RD, HAS_NORM, HAS_OFFSET)
    else:
        hk = h - HQ
        _norm_rope_row(k_ptr + t * stride_kt + hk * stride_kh, ko_ptr + (t * HK + hk) * D,
                       kw_ptr, cos_row, sin_row, eps, offset, D, D_P, RD, HAS_NORM, HAS_OFFSET)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float, offset: float, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, hq, d = q.shape
    hk = k.shape[1]
    rd = cos.shape[-1]
    assert k.shape == (t, hk, d) and q.stride(-1) == 1 and k.stride(-1) == 1
    assert rd % 2 == 0 and rd <= d and cos.shape[0] == sin.shape[0] == t
    cos2, sin2 = cos.reshape(t, rd), sin.reshape(t, rd)
    assert cos2.stride(-1) == 1 and sin2.stride(-1) == 1
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, hk, d, dtype=k.dtype, device=k.device)
    has_norm = q_weight is not None and k_weight is not None
    if t:
        _qk_norm_rope_kernel[(t, hq + hk)](
            q, k, q_weight if has_norm else q, k_weight if has_norm else k, cos2, sin2,
            q_out, k_out, eps, offset,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos2.stride(0), sin2.stride(0),
            HQ=hq, HK=hk, D=d, D_P=triton.next_power_of_2(d), RD=rd, HAS_NORM=has_norm,
            HAS_OFFSET=bool(offset), num_warps=2 if d <= 256 else 4)
    return q_out, k_out
