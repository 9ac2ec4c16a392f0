"""Triton weight-only GEMV for decode (a few rows, each with its own expert): int4, int8, FP8 block.

Same signature as `spillover.kernels.ref_quant.quant_matmul_ref` (`quant_gemv`) and
`fp8_matmul_ref` (`fp8_gemv`). Decode is bound by reading the weight once, so the kernel is built
around wide loads and cheap unpacking:
- codes are read as int32 words (8 int4 or 4 int8/fp8 codes each), a [BLOCK_N, BLOCK_K] tile per
  step, so every thread issues 16-byte loads and many are in flight at once;
- int codes become floats with the exponent trick ((c | 0x4B000000) as float32 = 2^23 + c), an
  integer OR and a float subtract at full rate, instead of int->float conversions, which run at a
  quarter rate on Hopper and alone capped int4 at ~2 TB/s;
- a tile may span several quantization groups: partial sums are kept per group and scaled once
  ([BLOCK_N, groups]), so BLOCK_K is not limited by the group size;
- split-K (`SPLIT_K` > 1) gives a few rows of a narrow matrix enough programs to fill the GPU; the
  partial sums go to a float32 buffer summed in a fixed order (deterministic, unlike atomics).
FP8 block weights (Qwen's official FP8) share the kernel: the codes are bit-cast to float8e4nv and
the scale is per 128 x 128 block (SCALE_ROWS = 128). This module imports triton at the top: import
it only through spillover.quant.dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FMT_INT4, FMT_INT8, FMT_FP8 = 0, 1, 2
_MAGIC = 8388608.0  # 2^23: float32 whose low mantissa bits hold an integer code


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, eid_ptr, y_ptr,
    N, K_SPLIT,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_yk, stride_yt,
    FMT: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, OFFSET: tl.constexpr,
    HAS_MINS: tl.constexpr, HAS_EIDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    VALS: tl.constexpr = 8 if FMT == 0 else 4  # codes per int32 word
    BITS: tl.constexpr = 32 // VALS
    MASK: tl.constexpr = (1 << BITS) - 1
    SUB_K: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP  # one scale per sub-tile
    NG: tl.constexpr = BLOCK_K // SUB_K
    SUB_W: tl.constexpr = SUB_K // VALS
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(eid_ptr + row).to(tl.int64) if HAS_EIDS else 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    w_rows = w_ptr + e * stride_we + n64 * stride_wn  # stride_wn counts int32 words
    s_rows = s_ptr + e * stride_se + (n64 // SCALE_ROWS) * stride_sn
    m_rows = m_ptr + e * stride_se + (n64 // SCALE_ROWS) * stride_sn
    x_row = x_ptr + row * stride_xt
    g_ar = tl.arange(0, NG)
    j_ar = tl.arange(0, SUB_W)
    v_ar = tl.arange(0, VALS)
    w_off = g_ar[:, None] * SUB_W + j_ar[None, :]  # [NG, SUB_W] word offsets in a tile
    x_off = w_off[:, :, None] * VALS + v_ar[None, None, :]  # [NG, SUB_W, VALS]: k = word * VALS + v
    shifts = (v_ar * BITS)[None, None, None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        words = tl.load(w_rows[:, None, None] + (k0 // VALS + w_off)[None, :, :],
                        mask=mask_n[:, None, None], other=0)  # [BLOCK_N, NG, SUB_W] int32
        codes = (words[:, :, :, None] >> shifts) & MASK  # [BLOCK_N, NG, SUB_W, VALS]
        if FMT == 2:
            q = codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        elif FMT == 1:  # signed int8: c ^ 128 = c + 128 as an unsigned byte
            q = ((codes ^ 128) | 0x4B000000).to(tl.float32, bitcast=True) - (_MAGIC + 128.0)
        else:
            q = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (_MAGIC + OFFSET)
        xv = tl.load(x_row + k0 + x_off).to(tl.float32)  # [NG, SUB_W, VALS]
        part = tl.sum(tl.sum(q * xv[None, :, :, :], axis=3), axis=2)  # [BLOCK_N, NG]
        g = k0 // GROUP + g_ar
        s = tl.load(s_rows[:, None] + g[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        acc += tl.sum(part * s, axis=1)
        if HAS_MINS:
            xs = tl.sum(tl.sum(xv, axis=2), axis=1)  # [NG]
            m = tl.load(m_rows[:, None] + g[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
            acc += tl.sum(m * xs[None, :], axis=1)
    y = y_ptr + pid_k * stride_yk + row * stride_yt + offs_n
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4

    def __str__(self) -> str:
        return f"BLOCK_N={self.block_n} BLOCK_K={self.block_k} SPLIT_K={self.split_k} warps={self.num_warps}"


TARGET_PROGRAMS = 1024  # ~8 per SM on a 132-SM H100/H200: enough loads in flight to cover latency


def pick_block_k(k: int, group_size: int, limit: int = 256) -> int:
    """Largest power of two <= limit dividing both K and the group size (>= 16 for tl.arange)."""
    b = limit
    while b > 16 and (group_size % b or k % b):
        b //= 2
    if group_size % b or k % b:
        raise ValueError(f"K={k} / group {group_size} need a multiple of 16")
    return b


def default_config(rows: int, n: int, k: int, bits: int) -> GemvConfig:
    """Tile and split for `rows` rows of an [N, K] weight (from bench/quant_gemv.py's sweep).

    A tile reads 2-4 KB of codes per row block per step (BLOCK_K 512 int4 / 256 int8); BLOCK_N
    shrinks and split-K grows until about TARGET_PROGRAMS programs exist, because one decode token
    of a narrow matrix otherwise leaves most SMs idle.
    """
    block_k = 512 if bits == 4 else 256
    while block_k > 32 and k % block_k:
        block_k //= 2
    block_n = 16
    split = 1
    while rows * triton.cdiv(n, block_n) * split < TARGET_PROGRAMS:
        if block_n > 4:
            block_n //= 2
        elif k % (block_k * split * 2) == 0 and k // (split * 2) >= block_k:
            split *= 2
        else:
            break
    return GemvConfig(block_n, block_k, split, 4)


def _launch(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
            expert_ids: torch.Tensor | None, *, fmt: int, group: int, scale_rows: int, offset: int,
            cfg: GemvConfig) -> torch.Tensor:
    t, k = x.shape
    n = words.shape[1]
    vals = 8 if fmt == FMT_INT4 else 4
    if k % (cfg.block_k * cfg.split_k) or cfg.block_k % vals:
        raise ValueError(f"K={k} is not a multiple of BLOCK_K x SPLIT_K = {cfg.block_k} x {cfg.split_k}")
    if cfg.block_k > group and cfg.block_k % group:
        raise ValueError(f"BLOCK_K={cfg.block_k} must be a multiple of the group {group} when larger")
    if cfg.block_k < group and group % cfg.block_k:
        raise ValueError(f"BLOCK_K={cfg.block_k} must divide the group {group} when smaller")
    if expert_ids is not None:
        assert expert_ids.shape == (t,) and expert_ids.dtype in (torch.int32, torch.int64)
    split = cfg.split_k
    out = torch.empty((split, t, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), t, split)
    _gemv_kernel[grid](
        x, words, scales, mins if mins is not None else scales,
        expert_ids if expert_ids is not None else x, out,
        n, k // split,
        x.stride(0), words.stride(0), words.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1),
        FMT=fmt, GROUP=group, SCALE_ROWS=scale_rows, OFFSET=offset,
        HAS_MINS=mins is not None, HAS_EIDS=expert_ids is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
    )
    # Fixed-order reduction over the splits keeps results deterministic (atomics would not).
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


def as_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8/int8/fp8 codes [E, N, K'] -> int32 words [E, N, K'/4] (same bytes, little-endian)."""
    if codes.shape[-1] % 4:
        raise ValueError(f"packed row of {codes.shape[-1]} bytes is not a whole number of int32 words")
    return codes.contiguous().view(torch.uint8).view(torch.int32)


def quant_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    t, k = x.shape
    e, n, kp = qweight.shape
    assert kp * (2 if bits == 4 else 1) == k, "qweight does not match x's K"
    assert x.stride(1) == 1 and scales.stride(2) == 1
    assert scales.shape == (e, n, k // group_size)
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    cfg = config or default_config(t, n, k, bits)
    return _launch(x, as_words(qweight), scales, mins, expert_ids, fmt=FMT_INT4 if bits == 4 else FMT_INT8,
                   group=group_size, scale_rows=1, offset=8 if bits == 4 and mins is None else 0, cfg=cfg)


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    expert_ids: torch.Tensor | None,
    *,
    block: int = 128,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [T, K] @ FP8 e4m3 weight [E, N, K] with float32 block scales [E, ceil(N/B), K/B]."""
    t, k = x.shape
    e, n, kw = weight.shape
    assert kw == k and x.stride(1) == 1 and scale.stride(2) == 1 and k % block == 0
    assert scale.shape == (e, triton.cdiv(n, block), k // block)
    cfg = config or default_config(t, n, k, 8)
    return _launch(x, as_words(weight), scale, None, expert_ids, fmt=FMT_FP8, group=block, scale_rows=block,
                   offset=0, cfg=cfg)
