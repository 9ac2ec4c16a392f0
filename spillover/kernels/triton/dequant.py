"""Triton dequantization of one packed weight to 16 bits, for dense prefill with many rows.

On a dense weight with more than a few rows torch's bf16 matmul (cuBLAS) beats our GEMMs on
dequantized tiles, so the dispatcher dequantizes the weight once per call and hands it to cuBLAS.
With torch ops (a layout transpose, float32 intermediates) that dequantization was slow; this kernel
reads the packed bytes and writes the bf16 weight in one pass (`python bench/quant_gemm.py`, the
deq+mm rows).

`dequant_kn` has the signature of `ref_quant.dequant_kn_ref` (int4/int8, the GPU "kn" layout: words
[E, K/VALS, N]); `dequant_fp8` that of `ref_quant.dequant_fp8_block_ref` (e4m3 [N, K], float32
scales per BN x BK block). One kernel reads both through word and scale strides, like `quant_gemm`:
a program decodes a [BLOCK_N, BLOCK_W] tile of words (codes as in the GEMV, `_codes`) and writes its
[BLOCK_N, BLOCK_W * VALS] outputs as contiguous rows. This module imports triton at the top: import
it only through spillover.kernels.quant_dispatch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spillover.kernels.ref_quant import fp8_block_shape
from spillover.kernels.triton.int_codes import (
    FMT_FP8,
    FMT_INT4,
    FMT_INT8,
    _load_k_order,
    code_offset,
)


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, m_ptr, out_ptr,
    N, K,
    stride_wk, stride_wn, stride_sg, stride_sn, stride_on,
    FMT: tl.constexpr, GROUP: tl.constexpr, SN: tl.constexpr, OFFSET: tl.constexpr,
    HAS_MINS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    VALS: tl.constexpr = 8 if FMT == 0 else 4
    GROUP_W: tl.constexpr = GROUP // VALS
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kw = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (offs_n < N)[:, None] & (kw < K // VALS)[None, :]
    s_at = (offs_n // SN)[:, None] * stride_sn + (kw // GROUP_W)[None, :] * stride_sg
    # [BN, BW * VALS]
    v = _load_k_order(w_ptr + offs_n[:, None] * stride_wn + kw[None, :] * stride_wk,
                      s_ptr + s_at, m_ptr + s_at, mask, FMT, OFFSET, HAS_MINS, BLOCK_N, BLOCK_W)
    k = tl.program_id(0) * (BLOCK_W * VALS) + tl.arange(0, BLOCK_W * VALS)
    tl.store(out_ptr + offs_n[:, None] * stride_on + k[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (k < K)[None, :])


BLOCK_N, BLOCK_W, NUM_WARPS = 32, 32, 4  # a tile sweep kept these; python bench/quant_gemm.py


def _run(words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, n: int, k: int,
         vals: int, w_strides: tuple[int, int], s_strides: tuple[int, int], out_dtype: torch.dtype,
         **formats: int | bool) -> torch.Tensor:
    out = torch.empty(n, k, dtype=out_dtype, device=words.device)
    grid = (triton.cdiv(k // vals, BLOCK_W), triton.cdiv(n, BLOCK_N))
    _dequant_kernel[grid](words, scales, mins if mins is not None else scales, out, n, k,
                          *w_strides, *s_strides,
                          out.stride(0), HAS_MINS=mins is not None, BLOCK_N=BLOCK_N,
                          BLOCK_W=BLOCK_W, num_warps=NUM_WARPS, **formats)
    return out


def dequant_kn(words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, expert: int, *,
               bits: int, group_size: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Expert `expert` of int32 words [E, K/VALS, N] with scales/mins [E, K/G, N] -> [N, K]
    in out_dtype."""
    vals = 32 // bits
    w, s = words[expert], scales[expert]
    kw, n = w.shape
    assert w.dtype == torch.int32 and w.stride(1) == 1
    assert s.shape == (kw * vals // group_size, n) and s.stride(1) == 1
    m = mins[expert] if mins is not None else None
    if m is not None:
        assert m.shape == s.shape and m.stride() == s.stride()
    fmt = FMT_INT4 if bits == 4 else FMT_INT8
    return _run(w, s, m, n, kw * vals, vals, (w.stride(0), 1), (s.stride(0), 1), out_dtype,
                FMT=fmt, GROUP=group_size, SN=1, OFFSET=code_offset(bits, m is not None))


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int | tuple[int, int] = 128,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 e4m3 [N, K] with float32 block scales [ceil(N/BN), K/BK] -> [N, K] in out_dtype."""
    n, k = weight.shape
    block_rows, block_k = fp8_block_shape(block)
    assert k % 4 == 0 and k % block_k == 0 and block_k % 4 == 0 and scale.stride(1) == 1
    assert scale.shape == (triton.cdiv(n, block_rows), k // block_k), (scale.shape, block)
    words = weight.contiguous().view(torch.uint8).view(torch.int32)  # [N, K/4]
    return _run(words, scale, None, n, k, 4, (1, words.stride(0)), (1, scale.stride(0)), out_dtype,
                FMT=FMT_FP8, GROUP=block_k, SN=block_rows, OFFSET=0)
