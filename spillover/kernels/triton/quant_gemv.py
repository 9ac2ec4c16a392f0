"""Triton W4A16 / W8A16 GEMV for decode (a few rows, each with its own expert).

Same signature as `spillover.kernels.ref_quant.quant_matmul_ref`. One program computes BLOCK_N
outputs of one row; it walks K in BLOCK_K steps that never straddle a quantization group, so the
group's scale (and min) factor out of the inner sum: acc += s * sum((q - off) * x) + m * sum(x).
For int4 the even/odd k halves come straight from the low/high nibbles, so no interleave is needed.
This module imports triton at the top: import it only through spillover.quant.dispatch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_gemv_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, eid_ptr, y_ptr,
    N, K,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_yt,
    BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr,
    HAS_MINS: tl.constexpr, HAS_EIDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    e = tl.load(eid_ptr + row).to(tl.int64) if HAS_EIDS else 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = s_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    m_rows = m_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    x_row = x_ptr + row * stride_xt
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 4:
            half = tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_rows + (k0 // 2 + half)[None, :], mask=mask_n[:, None], other=0)
            lo = (packed & 15).to(tl.float32) - OFFSET
            hi = (packed >> 4).to(tl.float32) - OFFSET
            x_even = tl.load(x_row + k0 + 2 * half).to(tl.float32)
            x_odd = tl.load(x_row + k0 + 2 * half + 1).to(tl.float32)
            dot = tl.sum(lo * x_even[None, :] + hi * x_odd[None, :], axis=1)
            xsum = tl.sum(x_even, axis=0) + tl.sum(x_odd, axis=0)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
            xv = tl.load(x_row + offs_k).to(tl.float32)
            dot = tl.sum((q - OFFSET) * xv[None, :], axis=1)
            xsum = tl.sum(xv, axis=0)
        g = k0 // GROUP
        s = tl.load(s_rows + g, mask=mask_n, other=0).to(tl.float32)
        acc += s * dot
        if HAS_MINS:
            m = tl.load(m_rows + g, mask=mask_n, other=0).to(tl.float32)
            acc += m * xsum
    tl.store(y_ptr + row * stride_yt + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def pick_block_k(k: int, group_size: int, limit: int = 256) -> int:
    """Largest power of two <= limit dividing both K and the group size (>= 16 for tl.arange)."""
    b = limit
    while b > 16 and (group_size % b or k % b):
        b //= 2
    if group_size % b or k % b:
        raise ValueError(f"K={k} / group {group_size} need a multiple of 16")
    return b


def quant_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    block_n: int = 32,
    block_k: int | None = None,
) -> torch.Tensor:
    t, k = x.shape
    e, n, kp = qweight.shape
    assert kp * (2 if bits == 4 else 1) == k, "qweight does not match x's K"
    assert x.stride(1) == 1 and qweight.stride(2) == 1 and scales.stride(2) == 1
    assert scales.shape == (e, n, k // group_size)
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    if expert_ids is not None:
        assert expert_ids.shape == (t,) and expert_ids.dtype in (torch.int32, torch.int64)
    bk = block_k or pick_block_k(k, group_size)
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), t)
    _quant_gemv_kernel[grid](
        x, qweight, scales, mins if mins is not None else scales,
        expert_ids if expert_ids is not None else x, y,
        n, k,
        x.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), y.stride(0),
        BITS=bits, GROUP=group_size, OFFSET=8 if bits == 4 and mins is None else 0,
        HAS_MINS=mins is not None, HAS_EIDS=expert_ids is not None,
        BLOCK_N=block_n, BLOCK_K=bk,
    )
    return y
