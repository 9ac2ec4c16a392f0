"""Triton int4 GEMV for MoE decode on tensor cores: inline-PTX mma.sync on bf16 pairs.

The CUDA-core GEMV (`quant_gemv.py`) spends about 4.4 SASS instructions per int4 code. Here the
codes become bf16 on the CUDA cores with one shift and one LOP3 per 2 codes (a nibble under the bf16
exponent of 128 reads as 128 + c) and are multiplied on the tensor cores, x in every column of B,
one column used: about 2 instructions per code. Every product carries 128 * x; that is taken off per
quantization group from a per-group sum of x. `python bench/int4_mma_gemv.py` measures it against
the CUDA-core GEMV: faster for int4 experts at Qwen3-Next's MoE shapes (w13 1024x2048, w2 2048x512)
on Hopper, asymmetric and symmetric, slower for dense 4096x4096, so
`spillover.kernels.quant_dispatch` uses it only for g128 experts at those K, on sm_90 (its
INT4_MMA_* constants). There the experts' words are held tiled (`ref_quant.tile_words`,
`tiled=True`): each warp step loads 256 contiguous bytes instead of four 64-byte pieces 4 N bytes
apart, which is faster again. The kn layout stays supported (tests, the bench, other callers).
Figures: docs/kernel_notes.md.

The kernel is latency-bound, so ptxas's schedule decides its speed more than its instruction count:
the same source compiled under different register caps runs measurably apart at the same register
count. `default_mma_config` holds the measured choice per case; re-measure it with the bench after
a Triton upgrade.

Lane mapping: thread r of a program is warp r // 32, lane r % 32 = 4 g + t; its 2 output channels
n0 + 2 g + v are rows g (v = 0) and g + 8 (v = 1) of one m16n8k16 tile; at step s lane t supplies
the codes of word row 4 s + t of its warp's K range (32 word rows = 256 codes per warp). Tensors are
[threads, 2] so that Triton has one layout without replication (a 4D [w, g, t, v] tile gets a thread
order that changes between Triton versions); a guard turns the output into NaN if a thread's
hardware id is not the row it was given. Inline PTX does not run in the Triton interpreter: GPU
tests only. This module imports triton at the top: import it only through
spillover.kernels.quant_dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from spillover.kernels.triton.int_codes import code_offset
from spillover.kernels.triton.quant_gemv import _pdl_start, gdc_wait, pdl_launch


def _mma(d: str, a: str, b: str, c: str) -> str:
    return (f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            f"{{{d}}}, {{{a}}}, {{{b}}}, {{{c}}};\n")


def _codes_ptx(first: int) -> str:
    """bf16 pairs p0-p7 = 128 + (codes i, i + 4) of words ${first} and ${first + 1}."""
    out = ""
    for v in range(2):
        w = f"${first + v}"
        out += f"lop3.b32 p{4 * v}, {w}, 0x000F000F, 0x43004300, 0xea;\n"
        for i in (1, 2, 3):
            out += (f"shr.u32 s{i - 1}, {w}, {4 * i};\n"
                    f"lop3.b32 p{4 * v + i}, s{i - 1}, 0x000F000F, 0x43004300, 0xea;\n")
    return out


_X_PAIRS = """prmt.b32 xp0, x0, x2, 0x5410;
prmt.b32 xp1, x0, x2, 0x7632;
prmt.b32 xp2, x1, x3, 0x5410;
prmt.b32 xp3, x1, x3, 0x7632;
"""
_HEAD = "{\n.reg .b32 x<4>, xp<4>, p<8>, s<3>;\n.reg .f32 d<4>;\n"
# x by shuffles: out c $0-1 (d0, d2), c2 $2-3 (d1, d3) | in w $4-5, xa $6-7, xb $8-9,
# src $10-11, c $12-13, c2 $14-15 (src: the lane that holds the word row's x)
_STEP_SHFL = tl.constexpr(
    _HEAD + "".join(f"shfl.sync.idx.b32 x{i}, ${6 + i}, $10, 0x1f, -1;\n" for i in range(4))
    + _X_PAIRS
    + _codes_ptx(4) + _mma("d0,d1,d2,d3", "p0,p4,p1,p5", "xp0,xp1", "$12,$14,$13,$15")
    + _mma("$0,$2,$1,$3", "p2,p6,p3,p7", "xp2,xp3", "d0,d1,d2,d3") + "}\n")
_STEP_SHFL_C = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 8 + ["f"] * 4))
# x from L1: out as above | in w $4-5, x $6-7 (two 64-bit halves of the word row's x),
# c $8-9, c2 $10-11
_STEP_L1 = tl.constexpr(
    _HEAD + "mov.b64 {x0, x1}, $6;\nmov.b64 {x2, x3}, $7;\n" + _X_PAIRS
    + _codes_ptx(4) + _mma("d0,d1,d2,d3", "p0,p4,p1,p5", "xp0,xp1", "$8,$10,$9,$11")
    + _mma("$0,$2,$1,$3", "p2,p6,p3,p7", "xp2,xp3", "d0,d1,d2,d3") + "}\n")
_STEP_L1_C = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 2 + ["l"] * 2 + ["f"] * 4))


def _xsum_ptx(lanes: int) -> str:
    """Sum of the 8 bf16 x of this lane's word row ($2-5), then over aligned runs of
    `lanes` lanes."""
    body = "{\n.reg .b32 h<8>;\n.reg .f32 f<8>, a;\n"
    for i in range(4):
        body += f"shl.b32 h{2 * i}, ${2 + i}, 16;\nand.b32 h{2 * i + 1}, ${2 + i}, 0xFFFF0000;\n"
    body += "".join(f"mov.b32 f{i}, h{i};\n" for i in range(8))
    body += "add.f32 f0, f0, f1;\nadd.f32 f2, f2, f3;\nadd.f32 f4, f4, f5;\nadd.f32 f6, f6, f7;\n"
    body += "add.f32 f0, f0, f2;\nadd.f32 f4, f4, f6;\nadd.f32 a, f0, f4;\n"
    k = 1
    while k < lanes:
        body += f"shfl.sync.bfly.b32 f1, a, {k}, 0x1f, -1;\nadd.f32 a, a, f1;\n"
        k *= 2
    return body + "mov.f32 $0, a;\nmov.f32 $1, a;\n}\n"


_XSUM4 = tl.constexpr(_xsum_ptx(4))
_XSUM8 = tl.constexpr(_xsum_ptx(8))
_XSUM16 = tl.constexpr(_xsum_ptx(16))
_XSUM_C = tl.constexpr("=f,=f,r,r,r,r")
_BCAST = tl.constexpr("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;")
_BCAST_C = tl.constexpr("=f,f,r")
_GUARD = tl.constexpr("{\n.reg .u32 l;\n.reg .pred q;\nmov.u32 l, %tid.x;\nsetp.ne.u32 q, l, $4;\n"
                      "selp.f32 $0, 0f7FC00000, 0f00000000, q;\nmov.f32 $1, $0;\n}\n")
_GUARD_C = tl.constexpr("=f,=f,r,r,r,r")


@triton.jit
def _xsum(xa, xb, GL: tl.constexpr):
    if GL == 4:
        return tl.inline_asm_elementwise(_XSUM4, _XSUM_C, [xa, xb], dtype=tl.float32, is_pure=True,
                                         pack=2)
    elif GL == 8:
        return tl.inline_asm_elementwise(_XSUM8, _XSUM_C, [xa, xb], dtype=tl.float32, is_pure=True,
                                         pack=2)
    else:
        return tl.inline_asm_elementwise(_XSUM16, _XSUM_C, [xa, xb], dtype=tl.float32, is_pure=True,
                                         pack=2)


@triton.jit
def _int4_mma_gemv_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, eid_ptr, y_ptr,
    N, stride_xt, stride_we, stride_wk, stride_se, stride_sg, stride_yt,
    GROUP: tl.constexpr, OFFSET: tl.constexpr, HAS_MINS: tl.constexpr, HAS_EIDS: tl.constexpr,
    NW: tl.constexpr, RW: tl.constexpr, PDL: tl.constexpr, X_L1: tl.constexpr, TILED: tl.constexpr,
    SPARSE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    e = _pdl_start(eid_ptr, row, PDL, HAS_EIDS)
    r = tl.arange(0, NW * 32)[:, None]
    vi = tl.arange(0, 2)[None, :]
    zero = tl.zeros([NW * 32, 2], dtype=tl.int32)
    wi = r // 32 + zero
    ti = r % 4 + zero
    n = pid_n * 16 + ((r % 32) // 4) * 2 + vi + zero
    mask_n = n < N
    if SPARSE:  # a row of expert -1 reads no weight (every load is masked) and writes zeros
        mask_n = n < tl.where(e >= 0, N, 0)
        e = tl.maximum(e, 0)
    S: tl.constexpr = RW // 4  # steps, all loaded up front
    tl.static_assert(RW == 32, "one word row per lane: x by shuffles and the group sums")
    SPG: tl.constexpr = GROUP // 32  # steps per group
    NG: tl.constexpr = S // SPG
    GL: tl.constexpr = GROUP // 8  # lanes (word rows) per group
    # weights and scales are never written by a kernel: with PDL they load before gdc_wait
    ws: "tuple[tl.tensor, ...]" = ()  # noqa: UP037 (Triton evaluates annotations; it has no `tuple`)
    if TILED:
        # `tiled_word_offset` of (wi * RW + ti + 4 step, n), written per lane: a warp's step is
        # 256 contiguous bytes, the next step 64 words on; N % 16 == 0, so no mask
        w_tile = w_ptr + e * stride_we + pid_n * (16 * NW * RW) + wi * (RW * 16) + (r % 32) * 2 + vi
        for step in tl.static_range(S):
            if SPARSE:
                ws = ws + (tl.load(w_tile + step * 64, mask=mask_n, other=0),)
            else:
                ws = ws + (tl.load(w_tile + step * 64),)
    else:
        w_tile = w_ptr + e * stride_we + (wi * RW + ti).to(tl.int64) * stride_wk + n
        for step in tl.static_range(S):
            ws = ws + (tl.load(w_tile + 4 * step * stride_wk, mask=mask_n, other=0),)
    s_tile = s_ptr + e * stride_se + wi * NG * stride_sg + n
    m_tile = m_ptr + e * stride_se + wi * NG * stride_sg + n
    s_cur = tl.load(s_tile, mask=mask_n, other=0).to(tl.float32)
    m_cur = s_cur
    if HAS_MINS:
        m_cur = tl.load(m_tile, mask=mask_n, other=0).to(tl.float32)
    if PDL and not HAS_EIDS:
        gdc_wait()
    # lane l holds x of its warp's word row l: for the group sums, and (X_L1 = 0) for
    # the other lanes
    lane = r % 32 + zero
    x_row = x_ptr.to(tl.pointer_type(tl.int32)) + row * (stride_xt // 2)
    x_pairs = x_row + (wi * RW + tl.minimum(lane, RW - 1)) * 4 + vi
    xa = tl.load(x_pairs)
    xb = tl.load(x_pairs + 2)
    x_quads = x_ptr.to(tl.pointer_type(tl.int64)) + row * (stride_xt // 4)
    xpart = _xsum(xa, xb, GL)
    guard = tl.inline_asm_elementwise(_GUARD, _GUARD_C, [ws[0], r + zero], dtype=tl.float32,
                                      is_pure=True, pack=2)
    y_acc = guard  # 0, or NaN where the lane mapping is not the assumed one
    c = tl.zeros([NW * 32, 2], dtype=tl.float32)
    c2 = tl.zeros([NW * 32, 2], dtype=tl.float32)
    s_nxt = s_cur
    m_nxt = m_cur
    for step in tl.static_range(S):
        if step % SPG == 0 and step // SPG + 1 < NG:  # the next group's scales, a group ahead
            s_nxt = tl.load(s_tile + (step // SPG + 1) * stride_sg, mask=mask_n,
                            other=0).to(tl.float32)
            if HAS_MINS:
                m_nxt = tl.load(m_tile + (step // SPG + 1) * stride_sg, mask=mask_n,
                                other=0).to(tl.float32)
        words = ws[step]
        if X_L1:
            xq = tl.load(x_quads + (wi * RW + ti + 4 * step) * 2 + vi)
            c, c2 = tl.inline_asm_elementwise(_STEP_L1, _STEP_L1_C, [words, xq, c, c2],
                                              dtype=(tl.float32, tl.float32), is_pure=True, pack=2)
        else:
            c, c2 = tl.inline_asm_elementwise(_STEP_SHFL, _STEP_SHFL_C,
                                              [words, xa, xb, ti + 4 * step, c, c2],
                                              dtype=(tl.float32, tl.float32), is_pure=True, pack=2)
        # end of a group: c holds sum x * (128 + code); take 128 * sum(x) off
        if step % SPG == SPG - 1:
            gsum = tl.inline_asm_elementwise(_BCAST, _BCAST_C, [xpart, zero + (step // SPG) * GL],
                                             dtype=tl.float32, is_pure=True, pack=1)
            if HAS_MINS:
                y_acc += s_cur * c + (m_cur - 128.0 * s_cur) * gsum
            else:
                y_acc += s_cur * (c - (128.0 + OFFSET) * gsum)
            s_cur = s_nxt
            m_cur = m_nxt
            c = tl.zeros([NW * 32, 2], dtype=tl.float32)
            c2 = tl.zeros([NW * 32, 2], dtype=tl.float32)
    # the 4 lanes t of a channel pair hold copies: max over them in-warp, then sum the warps
    y = tl.sum(tl.max(tl.reshape(y_acc, [NW, 8, 4, 2]), axis=2), axis=0)  # [8, 2]
    n2 = pid_n * 16 + tl.arange(0, 8)[:, None] * 2 + tl.arange(0, 2)[None, :]
    tl.store(y_ptr + row * stride_yt + n2, y.to(y_ptr.dtype.element_ty), mask=n2 < N)


WARP_K = 256  # codes of K per warp: 32 word rows, one per lane for x and the group sums


def unsupported(bits: int, group_size: int, k: int, x_dtype: torch.dtype) -> str | None:
    """Why this kernel cannot take the case, or None."""
    if bits != 4 or x_dtype != torch.bfloat16:
        return f"int{bits} with {x_dtype} activations (int4 and bf16 only)"
    if group_size not in (32, 64, 128):
        return f"group {group_size} (32, 64 or 128 only)"
    warps = k // WARP_K  # one warp per WARP_K codes: a power of two, at most 32
    if k % WARP_K or warps & (warps - 1) or warps > 32:
        return f"K={k} (256 times a power of two, at most {32 * WARP_K})"
    return None


@dataclass(frozen=True)
class MmaConfig:
    # x read from L1 at every step (else handed over by shuffles from the lane that holds it)
    x_l1: bool
    max_regs: int | None = None  # ptxas register cap: it changes the schedule, not only the count


def default_mma_config(symmetric: bool, k: int, tiled: bool = False) -> MmaConfig:
    """The fastest variant per case (re-derive: `python bench/int4_mma_gemv.py`, after a Triton
    upgrade too). Tiled words (what the dispatcher holds): x by shuffles with a 48-register cap,
    both formats and both MoE shapes. The kn layout: asymmetric int4 takes x from L1 at K >= 1024
    and by shuffles below, uncapped; symmetric int4 takes x from L1 with a 48-register cap
    (uncapped, ptxas picks a slower schedule)."""
    if tiled:
        return MmaConfig(x_l1=False, max_regs=48)
    if symmetric:
        return MmaConfig(x_l1=True, max_regs=48)
    return MmaConfig(x_l1=k >= 1024)


def int4_mma_gemv(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor | None,
                  expert_ids: torch.Tensor | None, *, bits: int, group_size: int,
                  tiled: bool = False,
                  config: MmaConfig | None = None, pdl: bool | None = None,
                  sparse: bool = False) -> torch.Tensor:
    """Same signature and result as `quant_matmul_kn_ref` (within bf16 rounding) for the cases
    `unsupported` accepts; tiled: words in the tiled layout (`ref_quant.tile_words`, N % 16 == 0).
    config: None = `default_mma_config`; pdl: None = where the GPU has it; sparse: rows whose
    expert id is -1 read no weight and come out zero."""
    t, k = x.shape
    e, kw, n = words.shape
    why = unsupported(bits, group_size, k, x.dtype)
    if why is not None:
        raise ValueError(f"int4_mma_gemv: unsupported {why}")
    assert words.dtype == torch.int32 and kw * 8 == k and words.stride(2) == 1
    assert scales.shape == (e, k // group_size, n) and scales.stride(2) == 1
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    if tiled:
        assert n % 16 == 0 and words.is_contiguous(), "tiled words: whole 16-channel tiles"
    # x rows are read 16 bytes at a time; a row stride of 0 (one token's row expanded over its
    # top-k experts) reads the same row for all
    if x.stride(1) != 1 or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    cfg = config or default_mma_config(mins is None, k, tiled)
    pdl, launch = pdl_launch(x.device, pdl)
    if cfg.max_regs is not None:
        launch["maxnreg"] = cfg.max_regs
    rw = WARP_K // 8
    nw = kw // rw
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    _int4_mma_gemv_kernel[(triton.cdiv(n, 16), t)](
        x, words, scales, mins if mins is not None else scales,
        expert_ids if expert_ids is not None else x, y,
        n, x.stride(0), words.stride(0), words.stride(1), scales.stride(0), scales.stride(1),
        y.stride(0),
        GROUP=group_size, OFFSET=code_offset(4, mins is not None), HAS_MINS=mins is not None,
        HAS_EIDS=expert_ids is not None, NW=nw, RW=rw, PDL=pdl, X_L1=cfg.x_l1, TILED=tiled,
        SPARSE=sparse and expert_ids is not None, num_warps=nw, **launch)
    return y
