"""Triton W4A16 / W8A16 / FP8 grouped GEMM for prefill (many rows; rows grouped by expert).

`quant_gemm` has the signature of `spillover.kernels.ref_quant.quant_matmul_kn_ref`: words
[E, K/VALS, N] int32, scales/mins [E, K/G, N] (what `GroupedIntWeight.to("cuda")` holds).
`fp8_gemm` has that of `fp8_matmul_ref`: FP8 e4m3 weights in the checkpoint's [E, N, K] layout (read
as int32 words of 4 codes), float32 scales per BN x BK block; the same kernel reads them through
its word and scale strides, so FP8 prefill no longer dequantizes whole weights (or every routed
expert, one matmul each) to bf16 first. Rows are grouped by expert and
each expert's segment padded to BLOCK_M (`align_rows`), so every M-block belongs to one expert. A
program loads a [BLOCK_N, BLOCK_W] tile of words, dequantizes it into a [BLOCK_N, BLOCK_W * VALS]
tile in the order of K (codes as in the GEMV, `_unpack_k_order`) and multiplies it with one
contiguous [BLOCK_M, BLOCK_W * VALS] tile of x on the tensor cores: one dot per step. A dense layer
is the E = 1, unsorted special case.

float32 activations: tl.dot defaults to TF32 on NVIDIA (10-bit mantissa inputs), which made the CUDA
run miss the float32 reference by ~1e-2 at K = 256 (the GEMV, using FMAs, passed); so float32
inputs ask for `ieee` precision. bf16/fp16 activations (the production path) are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from spillover.kernels.ref_quant import fp8_block_shape
from spillover.kernels.triton.int_codes import (
    FMT_FP8,
    FMT_INT4,
    FMT_INT8,
    _dequant_k_order,
    _load_k_order,
    code_offset,
    tiled_k_offset,
)

MIN_DOT_DEPTH = 16  # tl.dot needs K >= 16 on GPUs: BLOCK_K >= 16 words


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 16  # rows a program takes: every M-block belongs to one expert (`align_rows`)
    block_n: int = 64
    block_w: int = MIN_DOT_DEPTH  # words of K a step (its dot is BLOCK_W * VALS deep)
    num_warps: int = 4

    def __str__(self) -> str:
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} BLOCK_W={self.block_w} "
                f"warps={self.num_warps}")


@triton.jit
def _quant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, rows_ptr, beid_ptr, y_ptr,
    N, KW, num_rows,
    stride_xt, stride_we, stride_wk, stride_wn, stride_se, stride_sg, stride_sn, stride_yt,
    FMT: tl.constexpr, GROUP: tl.constexpr, SN: tl.constexpr, OFFSET: tl.constexpr,
    HAS_MINS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILED: tl.constexpr,
):
    VALS: tl.constexpr = 8 if FMT == 0 else 4
    GROUP_W: tl.constexpr = GROUP // VALS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(beid_ptr + pid_m).to(tl.int64)
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = rows < num_rows  # padding rows carry the sentinel num_rows
    # a block past the last expert's (sized for the worst case on the GPU, `align_rows`) has no
    # rows: its loop runs no steps and its store is masked off
    kw_end = tl.where(tl.load(rows_ptr + pid_m * BLOCK_M) < num_rows, KW, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    r = tl.arange(0, BLOCK_W)
    kk = tl.arange(0, BLOCK_W * VALS)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    # int (kn): word (kw, n) at kw * stride_wk + n, a scale per (group, n). FP8 (nk): word (n, kw)
    # at n * stride_wn + kw, a scale per (K block, SN output rows). Tiled int: `_load_tiled_words`
    w_rows = w_ptr + e * stride_we + offs_n[:, None] * stride_wn
    s_rows = s_ptr + e * stride_se + (offs_n // SN)[:, None] * stride_sn
    m_rows = m_ptr + e * stride_se + (offs_n // SN)[:, None] * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kw0 in range(0, kw_end, BLOCK_W):
        kw = (kw0 + r)[None, :]
        g = (kw // GROUP_W) * stride_sg
        if TILED:
            words = _load_tiled_words(w_ptr + e * stride_we, pid_n, kw0, KW, N, BLOCK_N, BLOCK_W)
            w = _dequant_k_order(words, s_rows + g, m_rows + g, mask_n[:, None],
                                 FMT, OFFSET, HAS_MINS, BLOCK_N, BLOCK_W)
        else:
            # [BLOCK_N, BLOCK_W * VALS]
            w = _load_k_order(w_rows + kw.to(tl.int64) * stride_wk, s_rows + g, m_rows + g,
                              mask_n[:, None], FMT, OFFSET, HAS_MINS, BLOCK_N, BLOCK_W)
        # [BLOCK_M, same K]
        xv = tl.load(x_rows + (kw0 * VALS + kk)[None, :], mask=mask_m[:, None], other=0)
        acc += tl.dot(xv, tl.trans(w.to(xv.dtype)), input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _load_tiled_words(w_expert, pid_n, kw0, KW, N, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Words [BLOCK_N, BLOCK_W] (channels pid_n * BLOCK_N on, word rows kw0 on) from the tiled
    layout. A 16-channel tile's BLOCK_W word rows (kw0 a multiple of BLOCK_W, 16 or 32) are
    BLOCK_W * 16 contiguous words (`ref_quant.tile_words`): loaded as such, in wide vectors, then
    put in [n, kw] order in registers. Addressing each word instead (a sum of an n and a kw part)
    was slower (python bench/quant_gemm.py)."""
    tl.static_assert(BLOCK_N % 16 == 0 and (BLOCK_W == 16 or BLOCK_W == 32),
                     "whole tiles and half/whole warps")
    NT: tl.constexpr = BLOCK_N // 16
    tile = pid_n * NT + tl.arange(0, NT)
    offs = (tile.to(tl.int64)[:, None] * (KW * 16) + tiled_k_offset(kw0)
            + tl.arange(0, BLOCK_W * 16)[None, :])
    raw = tl.load(w_expert + offs, mask=(tile < N // 16)[:, None], other=0)  # [NT, BLOCK_W * 16]
    # [tile, g, v, step, t]
    q = tl.permute(tl.reshape(raw, [NT, BLOCK_W // 4, 8, 4, 2]), (0, 2, 4, 1, 3))
    return tl.reshape(q, [BLOCK_N, BLOCK_W])  # channel 16 tile + 2 g + v, word row 4 step + t


def align_rows(expert_ids: torch.Tensor | None, t: int, block_m: int, device: torch.device,
               num_experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices [num_blocks * BLOCK_M] grouped by expert, padded with t; expert of each block).

    Each expert's rows fill whole blocks, padded at the end. With num_experts (the CUDA path)
    nothing waits for the device: the arrays have their worst-case size, t + min(t,
    E) * (BLOCK_M - 1) rows (the blocks past the last expert's are all padding, and the kernel skips
    them), and every step is a device op whose output size is known up front. Without, the ids are
    grouped on the host, at their exact size (one copy of the ids to the host).
    """
    if expert_ids is None:
        nb = triton.cdiv(t, block_m)
        rows = torch.full((nb * block_m,), t, dtype=torch.int32, device=device)
        rows[:t] = torch.arange(t, dtype=torch.int32, device=device)
        return rows, torch.zeros(nb, dtype=torch.int32, device=device)
    if num_experts is None:
        ids = expert_ids.cpu()
        order = torch.argsort(ids, stable=True)
        experts, counts = torch.unique_consecutive(ids[order], return_counts=True)
        padded = (counts + block_m - 1) // block_m * block_m
        rows = torch.full((int(padded.sum()),), t, dtype=torch.int32)
        starts = torch.cumsum(padded, 0) - padded
        seg = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
        rows[torch.arange(t) + seg] = order.to(torch.int32)
        block_eids = torch.repeat_interleave(experts, padded // block_m).to(torch.int32)
        return rows.to(device), block_eids.to(device)
    ids = expert_ids.to(device=device, dtype=torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    # place within its expert
    rank = torch.arange(t, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_ids]
    nb = triton.cdiv(t + min(t, num_experts) * (block_m - 1), block_m)
    rows = torch.full((nb * block_m,), t, dtype=torch.int32, device=device)
    rows[(ends - padded)[sorted_ids] + rank] = order.to(torch.int32)
    starts = torch.arange(nb, device=device) * block_m
    block_eids = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1)
    block_eids = block_eids.to(torch.int32)
    return rows, block_eids


def gemm_ok(k: int, bits: int, group_size: int) -> bool:
    """Whether K splits into whole BLOCK_K = 16-word steps whose rows each sit in one group."""
    vals = 32 // bits
    return k % (MIN_DOT_DEPTH * vals) == 0 and group_size % vals == 0


TARGET_PROGRAMS = 264  # two per SM on a 132-SM H100/H200 (python bench/quant_gemm.py --sweep)


def default_gemm_config(m_blocks: int, n: int, kw: int, vals: int,
                        tiled: bool = False) -> GemmConfig:
    """16-row blocks; 128 codes of K a step (16 int4 words, 32 int8/FP8 words) where K allows: each
    step unpacks a [BLOCK_N, 128] tile, and int4's 256-code tiles held 240-255 registers a thread (2
    programs an SM); 32 output channels a program while 64 would leave fewer than TARGET_PROGRAMS
    programs (a dense weight with few rows), else 64. Tiled int4 experts: 32 channels x 32 words
    (256 codes) a step, the best of 8 configs at Qwen3-Next's w13 and w2 for 1280-5120 rows, and
    faster there than the kn default (with 16 words a step the tiled GEMM was slower than kn).
    Re-derive: `python bench/quant_gemm.py --sweep`; figures in docs/kernel_notes.md."""
    if tiled and kw % 32 == 0:
        return GemmConfig(16, 32, 32, 4)
    block_n = 32 if m_blocks * triton.cdiv(n, 64) < TARGET_PROGRAMS else 64
    words = 128 // vals
    return GemmConfig(16, block_n, words if kw % words == 0 else MIN_DOT_DEPTH, 4)


def _launch(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
            expert_ids: torch.Tensor | None, n: int, kw: int, w_strides: tuple[int, int],
            s_strides: tuple[int, int], config: GemmConfig | None, tiled: bool = False,
            **formats: int | bool) -> torch.Tensor:
    """Group the rows by expert and run the kernel: w_strides (per word row of K, per output
    channel) and s_strides (per scale group along K, per scale row along N) say where the words
    and scales are."""
    t = x.shape[0]
    rows, block_eids = align_rows(expert_ids, t, config.block_m if config else 16, x.device,
                                  words.shape[0] if x.is_cuda else None)
    cfg = config or default_gemm_config(block_eids.numel(), n, kw, x.shape[1] // kw, tiled)
    if kw % cfg.block_w:
        raise ValueError(f"K ({kw} words) does not split into {cfg.block_w}-word GEMM steps")
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    grid = (block_eids.numel(), triton.cdiv(n, cfg.block_n))
    _quant_gemm_kernel[grid](
        x, words, scales, mins if mins is not None else scales, rows, block_eids, y,
        n, kw, t,
        x.stride(0), words.stride(0), *w_strides, scales.stride(0), *s_strides, y.stride(0),
        HAS_MINS=mins is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32: Triton's default
        num_warps=cfg.num_warps, TILED=tiled, **formats,
    )
    return y


def quant_gemm(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    config: GemmConfig | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """Same signature and result as `quant_matmul_kn_ref` (int4/int8, kn layout, or tiled)."""
    k = x.shape[1]
    e, kw, n = words.shape
    assert words.dtype == torch.int32 and kw * (32 // bits) == k
    assert x.stride(1) == 1 and words.stride(2) == 1
    assert scales.shape == (e, k // group_size, n) and scales.stride(2) == 1
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    if not gemm_ok(k, bits, group_size):
        raise ValueError(f"K={k} (group {group_size}) does not split into "
                         f"{MIN_DOT_DEPTH}-word GEMM steps")
    if tiled:
        assert kw % 32 == 0 and n % 16 == 0 and words.is_contiguous(), "tiled: whole 32 x 16 tiles"
    if tiled and config is not None and (config.block_n % 16 or config.block_w not in (16, 32)):
        raise ValueError("tiled words need BLOCK_N a multiple of 16 and BLOCK_W 16 "
                         f"or 32 ({config})")
    return _launch(x, words, scales, mins, expert_ids, n, kw, (words.stride(1), 1),
                   (scales.stride(1), 1), config,
                   FMT=FMT_INT4 if bits == 4 else FMT_INT8, GROUP=group_size, SN=1,
                   OFFSET=code_offset(bits, mins is not None), tiled=tiled)


def fp8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    expert_ids: torch.Tensor | None,
    *,
    block: int | tuple[int, int] = 128,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """x [T, K] @ FP8 e4m3 weight [E, N, K] with float32 block scales [E, ceil(N/BN), K/BK] (block:
    B for B x B, or (BN, BK)), rows grouped by expert. Same signature and result as
    `fp8_matmul_ref`."""
    k = x.shape[1]
    e, n, kk = weight.shape
    block_rows, block_k = fp8_block_shape(block)
    assert kk == k and x.stride(1) == 1 and scale.stride(2) == 1
    assert scale.shape == (e, triton.cdiv(n, block_rows), k // block_k), (scale.shape, block)
    if not gemm_ok(k, 8, block_k):
        raise ValueError(f"K={k} (block {block_k}) does not split into "
                         f"{MIN_DOT_DEPTH}-word GEMM steps")
    words = weight.contiguous().view(torch.uint8).view(torch.int32)  # [E, N, K/4]: 4 codes a word
    return _launch(x, words, scale, None, expert_ids, n, k // 4, (1, words.stride(1)),
                   (1, scale.stride(1)), config, FMT=FMT_FP8, GROUP=block_k, SN=block_rows,
                   OFFSET=0)
