"""Triton FP8 (e4m3, 128-block scales) GEMV for decode, on the checkpoint's row-major layout.

Words [E, N, K/4] (four FP8 codes each), float32 block scales [E, ceil(N/B), K/B]; each thread
accumulates a [BLOCK_N, BLOCK_K/4] tile over its K range and reduces once at the end. Codes,
split-K finish and workspace are shared with the int GEMV (`quant_gemv.py`); the kn layout
measured no faster for FP8. This module imports triton at the top: import it only through
spillover.kernels.quant_dispatch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spillover.kernels.ref_quant import fp8_block_shape
from spillover.kernels.triton.int_codes import _codes
from spillover.kernels.triton.quant_gemv import (
    GemvConfig,
    _check,
    _finish,
    _pdl_start,
    default_config,
    gdc_wait,
    pdl_launch,
    workspace,
)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, eid_ptr, y_ptr, ws_ptr, cnt_ptr,
    N, KW_SPLIT,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_yt,
    BLOCK: tl.constexpr, BLOCK_NS: tl.constexpr, HAS_EIDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    """FP8 in the checkpoint's row-major layout: words [E, N, K/4], scales [E, N/BLOCK_NS, K/BLOCK]
    (BLOCK_NS rows and BLOCK columns per scale).

    With PDL (as in the int GEMV) the programs let the next kernel launch at once, load their
    first step's weights (no kernel writes them) and wait for the previous kernel only before
    reading x; with expert ids they wait first. The loop is double-buffered: each step issues
    the next step's weight load before computing.
    """
    BLOCK_W: tl.constexpr = BLOCK_K // 4  # words per row per step
    BLOCK_KW: tl.constexpr = BLOCK // 4  # words per scale block along K
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = _pdl_start(eid_ptr, row, PDL, HAS_EIDS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    w_rows = w_ptr + e * stride_we + n64 * stride_wn  # stride_wn counts int32 words
    s_rows = s_ptr + e * stride_se + (n64 // BLOCK_NS) * stride_sn
    x_row = x_ptr + row * stride_xt
    j = tl.arange(0, BLOCK_W)
    # Partial sums stay per thread in a [BLOCK_N, BLOCK_W] tile until after the loop: a cross-thread
    # reduction every step made the loop compute-bound.
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    kw_begin = pid_k * KW_SPLIT  # counted in words, so the compiler sees 16-byte aligned tiles
    kw_end = kw_begin + KW_SPLIT
    nxt = tl.load(w_rows[:, None] + (kw_begin + j)[None, :], mask=mask_n[:, None], other=0)
    if PDL and not HAS_EIDS:
        gdc_wait()
    for kw0 in range(kw_begin, kw_end, BLOCK_W):
        words = nxt
        more = (tl.zeros([1, BLOCK_W], dtype=tl.int32) + kw0 + BLOCK_W) < kw_end  # uniform along K
        nxt = tl.load(w_rows[:, None] + (kw0 + BLOCK_W + j)[None, :], mask=mask_n[:, None] & more,
                      other=0)
        # the first code initialises the step's sums: zeroing them was one MOV per element
        dot = _codes(words, 0, 2, 0) * tl.load(x_row + (kw0 + j) * 4).to(tl.float32)[None, :]
        for i in tl.static_range(1, 4):
            dot += (_codes(words, i, 2, 0)
                    * tl.load(x_row + (kw0 + j) * 4 + i).to(tl.float32)[None, :])
        if BLOCK_K > BLOCK:  # several scale blocks per step: one scale per word
            g = ((kw0 + j) // BLOCK_KW)[None, :]
        else:
            g = tl.zeros([1, BLOCK_W], dtype=tl.int32) + kw0 // BLOCK_KW
        acc += dot * tl.load(s_rows[:, None] + g, mask=mask_n[:, None], other=0).to(tl.float32)
    _finish(tl.sum(acc, axis=1), y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, row, pid_n, pid_k, N,
            stride_yt, SPLIT_K)


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    expert_ids: torch.Tensor | None,
    *,
    block: int | tuple[int, int] = 128,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [T, K] @ FP8 e4m3 weight [E, N, K] with float32 block scales [E, ceil(N/BN), K/BK] (block:
    B for B x B, or (BN, BK), e.g. (1, K) for one scale per row).

    Same signature and result as `spillover.kernels.ref_quant.fp8_matmul_ref`. FP8 keeps the
    checkpoint's nk layout (the row-major kernel): the kn layout measured no faster for it.
    """
    t, k = x.shape
    e, n, kw = weight.shape
    block_n, block_k = fp8_block_shape(block)
    assert kw == k and x.stride(1) == 1 and scale.stride(2) == 1 and k % block_k == 0
    assert scale.shape == (e, triton.cdiv(n, block_n), k // block_k)
    cfg = config or default_config(t, n, k, 8, fp8=True)
    _check(k, 4, block_k, cfg)
    words = weight.contiguous().view(torch.uint8).view(torch.int32)
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), t, cfg.split_k)
    # split-K's partials and counters; one split never reads them (and skips the stream lookup)
    ws, cnt = workspace(x.device, cfg.split_k * t * n, grid[0] * t) if cfg.split_k > 1 else (y, y)
    pdl, launch = pdl_launch(x.device, cfg.pdl)
    _fp8_gemv_kernel[grid](
        x, words, scale, expert_ids if expert_ids is not None else x, y, ws, cnt,
        n, k // cfg.split_k // 4,
        x.stride(0), words.stride(0), words.stride(1), scale.stride(0), scale.stride(1),
        y.stride(0), BLOCK=block_k, BLOCK_NS=block_n, HAS_EIDS=expert_ids is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, PDL=pdl,
        num_warps=cfg.num_warps, **launch,
    )
    return y
