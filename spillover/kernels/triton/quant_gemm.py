"""Triton W4A16 / W8A16 grouped GEMM for prefill (many rows; rows grouped by expert), kn layout.

Same signature as `spillover.kernels.ref_quant.quant_matmul_kn_ref`: words [E, K/VALS, N] int32,
scales/mins [E, K/G, N] (what `GroupedIntWeight.to("cuda")` holds). Rows are grouped by expert and
each expert's segment padded to BLOCK_M (`align_rows`), so every M-block belongs to one expert. A
program loads a [BLOCK_W, BLOCK_N] tile of words and, for each code position i of a word,
dequantizes it (codes as in the GEMV, `_codes`) and multiplies it with the x columns
k = word * VALS + i on the tensor cores: VALS dots of depth BLOCK_W per step, no interleaving.
A dense layer is the E = 1, unsorted special case.

float32 activations: tl.dot defaults to TF32 on NVIDIA (10-bit mantissa inputs), which made the CUDA
run miss the float32 reference by ~1e-2 at K = 256 (the GEMV, using FMAs, passed); so float32
inputs ask for `ieee` precision. bf16/fp16 activations (the production path) are unaffected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spillover.kernels.triton.int_codes import FMT_INT4, FMT_INT8, _codes, _x_scale, code_offset

MIN_DOT_DEPTH = 16  # tl.dot needs K >= 16 on GPUs: BLOCK_K >= 16 words


@triton.jit
def _quant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, rows_ptr, beid_ptr, y_ptr,
    N, KW, num_rows,
    stride_xt, stride_we, stride_wk, stride_se, stride_sg, stride_yt,
    FMT: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr, HAS_MINS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    VALS: tl.constexpr = 8 if FMT == 0 else 4
    GROUP_W: tl.constexpr = GROUP // VALS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(beid_ptr + pid_m).to(tl.int64)
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = rows < num_rows  # padding rows carry the sentinel num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    r = tl.arange(0, BLOCK_W)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    w_cols = w_ptr + e * stride_we + offs_n[None, :]
    s_cols = s_ptr + e * stride_se + offs_n[None, :]
    m_cols = m_ptr + e * stride_se + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kw0 in range(0, KW, BLOCK_W):
        words = tl.load(w_cols + ((kw0 + r).to(tl.int64) * stride_wk)[:, None], mask=mask_n[None, :], other=0)
        g = ((kw0 + r) // GROUP_W)[:, None]  # [BLOCK_W, 1]: the group of each word row
        s = tl.load(s_cols + g * stride_sg, mask=mask_n[None, :], other=0).to(tl.float32)
        if HAS_MINS:
            m = tl.load(m_cols + g * stride_sg, mask=mask_n[None, :], other=0).to(tl.float32)
        for i in tl.static_range(VALS):
            w = _codes(words, i, FMT, OFFSET) * (s * _x_scale(i, FMT))  # [BLOCK_W, BLOCK_N] dequantized
            if HAS_MINS:
                w += m
            xv = tl.load(x_rows + ((kw0 + r) * VALS + i)[None, :], mask=mask_m[:, None], other=0)
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


def gemm_ok(k: int, bits: int, group_size: int) -> bool:
    """Whether K splits into whole BLOCK_K = 16-word steps whose rows each sit in one group."""
    vals = 32 // bits
    return k % (MIN_DOT_DEPTH * vals) == 0 and group_size % vals == 0


def quant_gemm(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    block_m: int = 16,
    block_n: int = 64,
    block_w: int = MIN_DOT_DEPTH,
) -> torch.Tensor:
    t, k = x.shape
    e, kw, n = words.shape
    vals = 32 // bits
    assert words.dtype == torch.int32 and kw * vals == k and x.stride(1) == 1 and words.stride(2) == 1
    assert scales.shape == (e, k // group_size, n) and scales.stride(2) == 1
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    if not gemm_ok(k, bits, group_size) or kw % block_w:
        raise ValueError(f"K={k} (group {group_size}) does not split into {block_w}-word GEMM steps")
    rows, block_eids = align_rows(expert_ids, t, block_m, x.device)
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    grid = (block_eids.numel(), triton.cdiv(n, block_n))
    _quant_gemm_kernel[grid](
        x, words, scales, mins if mins is not None else scales, rows, block_eids, y,
        n, kw, t,
        x.stride(0), words.stride(0), words.stride(1), scales.stride(0), scales.stride(1), y.stride(0),
        FMT=FMT_INT4 if bits == 4 else FMT_INT8, GROUP=group_size, OFFSET=code_offset(bits, mins is not None),
        HAS_MINS=mins is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32: Triton's default
    )
    return y
