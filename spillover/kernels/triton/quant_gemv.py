"""Triton weight-only GEMV for decode (a few rows, each with its own expert): int4, int8, FP8 block.

`quant_gemv` (int4/int8) reads the "kn" layout that `GroupedIntWeight.to("cuda")` holds, words
[E, K/VALS, N] int32: threads run along the output channels, so a warp's loads are coalesced, the
x values of a word are one broadcast shared by the 4 channels a thread holds, and each thread
accumulates over K in registers with a single cross-thread reduction at the end. The row-major
kernel (`fp8_gemv.py`) reads FP8 weights in their checkpoint layout; for FP8 it measured as fast.
At batch 1 a GEMV of these sizes is bound by instruction issue and by its fixed costs, so:
- a program covers its channels' whole K range in a few unrolled steps (loads in flight while the
  previous step computes), with no split-K: its cross-program reduction costs more than it saves;
- int4 codes become floats with the exponent trick: (w & (15 << 4p)) | 0x4B000000 read as float32
  is 2^23 + c * 2^(4p), so one LOP3 and one FADD replace shift, mask and int->float conversion
  (quarter rate on Hopper); x carries the 2^(-4p) instead (`_codes`, `_x_scale`);
- with 16-bit x, codes are biased: int8 takes one PRMT per code (byte u into a float32 as
  32768 + u, `_byte_biased`), int4 one LOP3 (a nibble in mantissa bits 8-19 under the right
  exponent is 2^(23-p) + c exactly, `_nibble_biased`), and the bias is taken off per row; float32
  x keeps the exact `_codes` (about 3 instructions per int4 code: LOP3, FADD, FFMA);
- bf16 x is read 4 values per 8-byte load and widened by shifts;
- a step may span several quantization groups; a thread row's steps then walk consecutive word
  rows of one group (`runs`), so its scale and min apply once per run, not once per word; a
  per-channel scale is applied once, after the sum;
- split-K (`SPLIT_K` > 1, for long K) stays within one launch: the last split to finish a tile
  sums the float32 partials in split order (deterministic, unlike atomic adds of the outputs);
- on sm_90+ it is launched with programmatic dependent launch: its programs start while the
  previous kernel finishes, load their first step's weights (which no kernel writes), and only
  then wait (`gdc_wait`) before reading x or expert ids; with expert ids nothing is loaded early.
  In a chain of decode GEMVs this hides most of each call's ramp-up and tail.
bench/quant_gemv.py measures them (and sweeps the configs `default_config` was fitted to).
This module imports triton at the top: import it only through spillover.kernels.quant_dispatch.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from spillover.kernels import triton_interpreted
from spillover.kernels.triton.gemv_config import (
    MAX_STEPS,
    GemvConfig,
    _check,
    default_config,
    runs_fit,
    workspace,
)
from spillover.kernels.triton.int_codes import (
    _PRMT_MAGIC,
    FMT_INT4,
    FMT_INT8,
    _bf16_pair,
    _row_bias,
    _word_dot,
    code_offset,
)

try:  # grid dependency control (Triton >= 3.4): the device side of programmatic dependent launch
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:
    HAS_GDC = False

    @triton.jit
    def gdc_wait() -> None:  # never called: PDL stays off without it
        pass

    @triton.jit
    def gdc_launch_dependents() -> None:
        pass


@triton.jit
def _pdl_start(eid_ptr, row, PDL: tl.constexpr, HAS_EIDS: tl.constexpr):
    """Start of a decode GEMV program: its expert (0 without expert ids).

    With programmatic dependent launch the next kernel may launch as soon as every program runs.
    What the previous kernel may still be writing (x, expert ids) is read only after gdc_wait: with
    expert ids that is here, before anything else; without, the caller loads weights first (no
    kernel writes them) and waits before reading x.
    """
    if PDL:
        gdc_launch_dependents()
    if HAS_EIDS:
        if PDL:
            gdc_wait()
        return tl.load(eid_ptr + row).to(tl.int64)
    else:
        return 0


@triton.jit
def _finish(y_vec, y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, row, pid_n, pid_k, N, stride_yt,
            SPLIT_K: tl.constexpr):
    """Write y, or (split-K) this split's partial; the last split to arrive sums all of them.

    One launch instead of kernel + reduction + cast: in a decode step each extra launch costs
    about as much as reading the weight. The sum runs in split order, so results are
    deterministic; the last program also resets its counter to 0 for the next call.
    """
    if SPLIT_K == 1:
        tl.store(y_ptr + row * stride_yt + offs_n, y_vec.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        rows = tl.num_programs(1)
        tl.store(ws_ptr + (pid_k * rows + row) * N + offs_n, y_vec, mask=mask_n)
        tl.debug_barrier()  # every thread's partial is written before the release below
        tile = row * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(y_vec)
            for sk in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + (sk * rows + row) * N + offs_n, mask=mask_n, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptr + row * stride_yt + offs_n, total.to(y_ptr.dtype.element_ty),
                     mask=mask_n)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _gemv_kn_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, eid_ptr, y_ptr, ws_ptr, cnt_ptr,
    N, magic,
    stride_xt, stride_we, stride_wk, stride_se, stride_sg, stride_yt,
    FMT: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr,
    HAS_MINS: tl.constexpr, HAS_EIDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, NSTEPS: tl.constexpr,
    BIASED: tl.constexpr, X_BF16: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr,
    RUNS: tl.constexpr, SPARSE: tl.constexpr,
):
    """int4/int8 on the transposed layout: words [E, K/VALS, N], scales/mins [E, K/G, N].

    Threads run along N, so a warp's loads are coalesced, x is a warp-uniform broadcast reused
    by every column a thread holds, and the K reduction stays in each thread. The NSTEPS steps
    are unrolled, so ptxas can issue a step's loads while the previous step computes.
    RUNS: thread row r takes word rows r * NSTEPS + step, a run inside one quantization group, so
    its scale and min load once and apply once after the steps, instead of once per word.
    """
    VALS: tl.constexpr = 8 if FMT == 0 else 4
    BLOCK_W: tl.constexpr = BLOCK_K // VALS
    GROUP_W: tl.constexpr = GROUP // VALS
    # one scale for the program's whole K range (per-channel int8): applied once, after the sum
    SCALE_ONCE: tl.constexpr = GROUP % (BLOCK_K * NSTEPS) == 0 and not HAS_MINS
    PER_WORD: tl.constexpr = BLOCK_K > GROUP  # several groups per step: one scale per word row
    tl.static_assert(not RUNS or (BIASED and PER_WORD and not SCALE_ONCE and GROUP_W % NSTEPS == 0))
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = _pdl_start(eid_ptr, row, PDL, HAS_EIDS)
    PREFETCH: tl.constexpr = PDL and not HAS_EIDS  # the first step's words load before gdc_wait
    kw_begin = pid_k * (NSTEPS * BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if SPARSE:  # a row of expert -1 loads nothing (every load is masked) and writes zeros
        mask_n = offs_n < tl.where(e >= 0, N, 0)
        e = tl.maximum(e, 0)
    r = tl.arange(0, BLOCK_W)
    ROW_STEP: tl.constexpr = 1 if RUNS else BLOCK_W  # word rows between a thread row's steps
    r0 = r * NSTEPS if RUNS else r  # the thread row's first word row
    w_tile = (w_ptr + e * stride_we + (kw_begin + r0).to(tl.int64)[:, None] * stride_wk
              + offs_n[None, :])
    s_cols = s_ptr + e * stride_se + offs_n[None, :]
    m_cols = m_ptr + e * stride_se + offs_n[None, :]
    x_row = x_ptr + row * stride_xt
    x_quads = x_row.to(tl.pointer_type(tl.int64))  # bf16 x: 4 values per 8-byte load
    acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
    # BIASED and (SCALE_ONCE or RUNS): the bias, per row
    btot = tl.zeros([BLOCK_W], dtype=tl.float32)
    xtot = tl.zeros([BLOCK_W], dtype=tl.float32)  # RUNS: the sum of x, per row
    if PREFETCH:
        words0 = tl.load(w_tile, mask=mask_n[None, :], other=0)
    if RUNS:  # weights: no kernel writes them, so they load before the wait too
        g_run = ((kw_begin + r0) // GROUP_W)[:, None] * stride_sg
        s_run = tl.load(s_cols + g_run, mask=mask_n[None, :], other=0).to(tl.float32)
        m_run = s_run
        if HAS_MINS:
            m_run = tl.load(m_cols + g_run, mask=mask_n[None, :], other=0).to(tl.float32)
    if PREFETCH:
        gdc_wait()
    for step in tl.static_range(NSTEPS):
        kw = kw_begin + step * ROW_STEP + r0  # this step's word rows
        if PREFETCH and step == 0:
            words = words0
        else:
            words = tl.load(w_tile + step * ROW_STEP * stride_wk, mask=mask_n[None, :], other=0)
        # a word row's VALS x values are contiguous: one load per 4, bf16 -> f32 by shifts
        if X_BF16:
            q = tl.load(x_quads + kw * (VALS // 4))
            x0, x1 = _bf16_pair(q.to(tl.int32))
            x2, x3 = _bf16_pair((q >> 32).to(tl.int32))
        else:
            x0 = tl.load(x_row + kw * VALS).to(tl.float32)
            x1 = tl.load(x_row + kw * VALS + 1).to(tl.float32)
            x2 = tl.load(x_row + kw * VALS + 2).to(tl.float32)
            x3 = tl.load(x_row + kw * VALS + 3).to(tl.float32)
        if FMT == 0:
            if X_BF16:
                q = tl.load(x_quads + kw * 2 + 1)
                x4, x5 = _bf16_pair(q.to(tl.int32))
                x6, x7 = _bf16_pair((q >> 32).to(tl.int32))
            else:
                x4 = tl.load(x_row + kw * 8 + 4).to(tl.float32)
                x5 = tl.load(x_row + kw * 8 + 5).to(tl.float32)
                x6 = tl.load(x_row + kw * 8 + 6).to(tl.float32)
                x7 = tl.load(x_row + kw * 8 + 7).to(tl.float32)
            xsum = (x2 + x5) + (x0 + x3 + x6) + (x1 + x4 + x7)  # grouped as `_row_bias` sums them
        else:
            x4 = x0
            x5 = x0
            x6 = x0
            x7 = x0
            xsum = x0 + x1 + x2 + x3
        if BIASED:
            bias = _row_bias(x0, x1, x2, x3, x4, x5, x6, x7, xsum, FMT, OFFSET)
        if SCALE_ONCE or RUNS:
            acc = _word_dot(acc, words, x0, x1, x2, x3, x4, x5, x6, x7, magic, FMT, OFFSET, BIASED,
                            USE_ASM)
            if BIASED:
                btot += bias
            if RUNS:
                xtot += xsum
        else:
            # the step's groups, from its absolute position: a split may start inside a group
            if PER_WORD:
                g = (kw // GROUP_W)[:, None]
            else:
                g = tl.zeros([1, 1], dtype=tl.int32) + (kw_begin + step * BLOCK_W) // GROUP_W
            s = tl.load(s_cols + g * stride_sg, mask=mask_n[None, :], other=0).to(tl.float32)
            if HAS_MINS:
                m = tl.load(m_cols + g * stride_sg, mask=mask_n[None, :], other=0).to(tl.float32)
            dot = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
            if BIASED:  # start from minus the bias: one FADD per word fewer
                dot -= bias[:, None]
            dot = _word_dot(dot, words, x0, x1, x2, x3, x4, x5, x6, x7, magic, FMT, OFFSET, BIASED,
                            USE_ASM)
            acc += dot * s
            if HAS_MINS:
                acc += m * xsum[:, None]
    if RUNS:
        acc = (acc - btot[:, None]) * s_run
        if HAS_MINS:
            acc += m_run * xtot[:, None]
    elif SCALE_ONCE and BIASED:
        acc -= btot[:, None]
    y_vec = tl.sum(acc, axis=0)
    if SCALE_ONCE:
        s_vec = s_ptr + e * stride_se + (kw_begin // GROUP_W) * stride_sg + offs_n
        y_vec = y_vec * tl.load(s_vec, mask=mask_n, other=0).to(tl.float32)
    # (stored under the shape's mask: a sparse row's zeros are written too)
    _finish(y_vec, y_ptr, ws_ptr, cnt_ptr, offs_n, offs_n < N, row, pid_n, pid_k, N, stride_yt,
            SPLIT_K)


@cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) and later, compiled, with Triton's GDC ops."""
    return (HAS_GDC and not triton_interpreted() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_launch(device: torch.device, pdl: bool | None) -> tuple[bool, dict[str, object]]:
    """(PDL on?, launch kwargs) for a GEMV launch; pdl None: wherever the GPU has it."""
    on = pdl_supported(device) if pdl is None else pdl
    return on, ({"launch_pdl": True} if on else {})


def quant_gemv(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    config: GemvConfig | None = None,
    sparse: bool = False,
) -> torch.Tensor:
    """int4/int8 GEMV on the kn layout: words [E, K/VALS, N] int32, scales/mins [E, K/G, N].

    Same signature and result as `spillover.kernels.ref_quant.quant_matmul_kn_ref`; sparse: rows
    whose expert id is -1 read no weight and come out zero.
    """
    t, k = x.shape
    e, kw, n = words.shape
    vals = 32 // bits
    assert words.dtype == torch.int32 and kw * vals == k
    assert x.stride(1) == 1 and words.stride(2) == 1
    assert scales.shape == (e, k // group_size, n) and scales.stride(2) == 1
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    if expert_ids is not None:
        assert expert_ids.shape == (t,) and expert_ids.dtype in (torch.int32, torch.int64)
    biased = x.dtype != torch.float32
    cfg = config or default_config(t, n, k, bits, symmetric=mins is None, group=group_size,
                                   biased=biased)
    _check(k, vals, group_size, cfg)
    steps = k // (cfg.block_k * cfg.split_k)
    if steps > MAX_STEPS:
        raise ValueError(f"K={k} takes {steps} unrolled steps of {cfg} (at most {MAX_STEPS}): "
                         "raise BLOCK_K or SPLIT_K")
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), t, cfg.split_k)
    # split-K's partials and counters; one split never reads them (and skips the stream lookup)
    ws, cnt = workspace(x.device, cfg.split_k * t * n, grid[0] * t) if cfg.split_k > 1 else (y, y)
    # 8-byte x loads need an aligned row start; 16-bit x takes the cheaper biased codes (the bias
    # costs ~1e-4 of the output's scale, below bf16's rounding); float32 x stays exact
    x_bf16 = x.dtype == torch.bfloat16 and x.data_ptr() % 8 == 0 and x.stride(0) % 4 == 0
    pdl, launch = pdl_launch(x.device, cfg.pdl)
    if cfg.max_regs is not None:
        launch["maxnreg"] = cfg.max_regs
    fits = runs_fit(k, bits, group_size, cfg, biased)
    runs = fits if cfg.runs is None else cfg.runs
    if runs and not fits:
        raise ValueError(f"{cfg}: runs=1 needs steps of several groups and steps dividing a "
                         "group's word rows")
    _gemv_kn_kernel[grid](
        x, words, scales, mins if mins is not None else scales,
        expert_ids if expert_ids is not None else x, y, ws, cnt,
        n, _PRMT_MAGIC,
        x.stride(0), words.stride(0), words.stride(1), scales.stride(0), scales.stride(1),
        y.stride(0),
        FMT=FMT_INT4 if bits == 4 else FMT_INT8, GROUP=group_size,
        OFFSET=code_offset(bits, mins is not None),
        HAS_MINS=mins is not None, HAS_EIDS=expert_ids is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, NSTEPS=steps,
        BIASED=biased, X_BF16=x_bf16, USE_ASM=not triton_interpreted(),
        PDL=pdl, RUNS=runs, SPARSE=sparse and expert_ids is not None, num_warps=cfg.num_warps,
        **launch,
    )
    return y
