"""Triton regrouping of Gated DeltaNet's input projections, one kernel instead of seven copies.

Same signature as `spillover.kernels.ref.gdn_split`. The checkpoint groups the projections per
key head g (qkvz: q_g | k_g | v_g | z_g, ba: b_g | a_g); the conv and the recurrence read
q | k | v over all heads, and the norm reads z per value head. One program moves one token's
group g to its places; the grid comes from shapes alone, so a CUDA graph can capture the launch.
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gdn_split_kernel(
    qkvz_ptr, ba_ptr, mixed_ptr, z_ptr, b_ptr, a_ptr,
    stride_in, stride_ba, stride_mixed, stride_z, stride_b, stride_a,
    HK: tl.constexpr, DK: tl.constexpr, RDV: tl.constexpr, R: tl.constexpr,
    DK_P: tl.constexpr, RDV_P: tl.constexpr, R_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    src = qkvz_ptr + t * stride_in + g * (2 * DK + 2 * RDV)
    dst = mixed_ptr + t * stride_mixed
    kk = tl.arange(0, DK_P)
    k_ok = kk < DK
    tl.store(dst + g * DK + kk, tl.load(src + kk, mask=k_ok), mask=k_ok)
    tl.store(dst + HK * DK + g * DK + kk, tl.load(src + DK + kk, mask=k_ok), mask=k_ok)
    vv = tl.arange(0, RDV_P)
    v_ok = vv < RDV
    tl.store(dst + 2 * HK * DK + g * RDV + vv, tl.load(src + 2 * DK + vv, mask=v_ok), mask=v_ok)
    tl.store(z_ptr + t * stride_z + g * RDV + vv, tl.load(src + 2 * DK + RDV + vv, mask=v_ok),
             mask=v_ok)
    j = tl.arange(0, R_P)
    j_ok = j < R
    ba = ba_ptr + t * stride_ba + g * 2 * R
    tl.store(b_ptr + t * stride_b + g * R + j, tl.load(ba + j, mask=j_ok), mask=j_ok)
    tl.store(a_ptr + t * stride_a + g * R + j, tl.load(ba + R + j, mask=j_ok), mask=j_ok)


def gdn_split(qkvz: torch.Tensor, ba: torch.Tensor, hk: int, dk: int, r: int,
              dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    t = qkvz.shape[0]
    assert qkvz.shape == (t, hk * (2 * dk + 2 * r * dv)) and ba.shape == (t, hk * 2 * r)
    assert qkvz.stride(-1) == 1 and ba.stride(-1) == 1
    hv = hk * r
    mixed = torch.empty(t, 2 * hk * dk + hv * dv, dtype=qkvz.dtype, device=qkvz.device)
    z = torch.empty(t, hv, dv, dtype=qkvz.dtype, device=qkvz.device)
    b = torch.empty(t, hv, dtype=ba.dtype, device=ba.device)
    a = torch.empty(t, hv, dtype=ba.dtype, device=ba.device)
    if t:
        _gdn_split_kernel[(t, hk)](
            qkvz, ba, mixed, z, b, a,
            qkvz.stride(0), ba.stride(0), mixed.stride(0), z.stride(0), b.stride(0), a.stride(0),
            HK=hk, DK=dk, RDV=r * dv, R=r, DK_P=triton.next_power_of_2(dk),
            RDV_P=triton.next_power_of_2(r * dv), R_P=max(2, triton.next_power_of_2(r)),
            num_warps=4)
    return mixed, z, b, a
