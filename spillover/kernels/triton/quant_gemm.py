"""Triton W4A16 / W8A16 grouped GEMM for prefill (many rows; rows sorted by expert).

Same signature as `spillover.kernels.ref_quant.quant_matmul_ref`. Rows are grouped by expert and
each expert's segment padded to BLOCK_M (`align_rows`), so every M-block belongs to one expert; a
program gathers its BLOCK_M rows of x, dequantizes a [BLOCK_K, BLOCK_N] weight tile in registers
and accumulates with tl.dot in float32. int4 uses two dots (even k from low nibbles, odd k from high
nibbles) instead of interleaving. A dense layer is the E = 1, unsorted special case.

float32 activations: tl.dot defaults to TF32 on NVIDIA (10-bit mantissa inputs), which made the CUDA
run miss the float32 reference by ~1e-2 at K = 256 (GEMV, using tl.sum, passed); so float32 inputs
ask for `ieee` precision. bf16/fp16 activations (the production path) are unaffected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, rows_ptr, beid_ptr, y_ptr,
    N, K, num_rows,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_yt,
    BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr, HAS_MINS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(beid_ptr + pid_m).to(tl.int64)
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = rows < num_rows  # padding rows carry the sentinel num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    w_cols = w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    s_cols = s_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    m_cols = m_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP
        s = tl.load(s_cols + g, mask=mask_n, other=0).to(tl.float32)
        if HAS_MINS:
            m = tl.load(m_cols + g, mask=mask_n, other=0).to(tl.float32)
        if BITS == 4:
            half = tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_cols + (k0 // 2 + half)[:, None], mask=mask_n[None, :], other=0)
            lo = ((packed & 15).to(tl.float32) - OFFSET) * s[None, :]
            hi = ((packed >> 4).to(tl.float32) - OFFSET) * s[None, :]
            if HAS_MINS:
                lo += m[None, :]
                hi += m[None, :]
            xe = tl.load(x_rows + (k0 + 2 * half)[None, :], mask=mask_m[:, None], other=0)
            xo = tl.load(x_rows + (k0 + 2 * half + 1)[None, :], mask=mask_m[:, None], other=0)
            acc += tl.dot(xe, lo.to(xe.dtype), input_precision=DOT_PRECISION)
            acc += tl.dot(xo, hi.to(xo.dtype), input_precision=DOT_PRECISION)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_cols + offs_k[:, None], mask=mask_n[None, :], other=0).to(tl.float32)
            w = (q - OFFSET) * s[None, :]
            if HAS_MINS:
                w += m[None, :]
            xv = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None], other=0)
            acc += tl.dot(xv, w.to(xv.dtype), input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def align_rows(expert_ids: torch.Tensor | None, t: int, block_m: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices [num_blocks * BLOCK_M] grouped by expert, padded with t; expert of each block)."""
    if expert_ids is None:
        nb = triton.cdiv(t, block_m)
        rows = torch.full((nb * block_m,), t, dtype=torch.int32, device=device)
        rows[:t] = torch.arange(t, dtype=torch.int32, device=device)
        return rows, torch.zeros(nb, dtype=torch.int32, device=device)
    order = torch.argsort(expert_ids, stable=True)
    experts, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
    padded = (counts + block_m - 1) // block_m * block_m
    rows = torch.full((int(padded.sum().item()),), t, dtype=torch.int32, device=device)
    starts = torch.cumsum(padded, 0) - padded
    seg = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    rows[torch.arange(t, device=device) + seg] = order.to(torch.int32)
    block_eids = torch.repeat_interleave(experts, padded // block_m).to(torch.int32)
    return rows, block_eids


def quant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int | None = None,
) -> torch.Tensor:
    from spillover.kernels.triton.quant_gemv import pick_block_k

    t, k = x.shape
    e, n, kp = qweight.shape
    assert kp * (2 if bits == 4 else 1) == k, "qweight does not match x's K"
    assert x.stride(1) == 1 and qweight.stride(2) == 1 and scales.stride(2) == 1
    assert scales.shape == (e, n, k // group_size)
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    bk = block_k or pick_block_k(k, group_size, limit=64)
    # int4 splits a K tile into even/odd halves; tl.dot needs K >= 16 on GPUs (the interpreter doesn't).
    assert bits != 4 or bk >= 32, f"int4 GEMM needs BLOCK_K >= 32 (group {group_size}, K {k})"
    rows, block_eids = align_rows(expert_ids, t, block_m, x.device)
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    grid = (block_eids.numel(), triton.cdiv(n, block_n))
    _quant_gemm_kernel[grid](
        x, qweight, scales, mins if mins is not None else scales, rows, block_eids, y,
        n, k, t,
        x.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), y.stride(0),
        BITS=bits, GROUP=group_size, OFFSET=8 if bits == 4 and mins is None else 0,
        HAS_MINS=mins is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32: Triton's default
    )
    return y
