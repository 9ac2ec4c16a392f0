"""Triton W4A16 GEMV on the tensor cores for decode: int4 kn words, bf16/fp16 activations.

Same signature and result as `spillover.kernels.ref_quant.quant_matmul_kn_ref` (and `quant_gemv`).
The FMA GEMV spends ~5 instructions per int4 code (unpack, float, offset, FMA); at batch 1 that,
not memory, bounds it. Here a code costs about one: each pair of words becomes eight registers of
two 16-bit floats with PRMT + LOP3 (`_ASM`), every nibble OR-ed into the mantissa of a "magic"
float (bf16 0x4300 = 128, fp16 0x6400 = 1024) so the value is exactly BIAS + code, with no shift
to bit 0, no int->float conversion and no subtraction per code. The multiply-add runs on the tensor
cores: x is the A operand (16 MMA rows that all read the one x row; 15 are wasted, the tensor
cores have the throughput to spare), the codes the B operand, float32 accumulation (products of
16-bit floats are exact). The bias and the offset come off once per group, not per code:

    y[n] = sum_g s[g,n] * (sum_k x[k] * (BIAS + q[k,n])) + X[g] * (m[g,n] - (BIAS + OFFSET) * s[g,n])

with X[g] = sum of x over group g (float32). A step is 16 words x 8 codes = 128 values of K, so
groups must be multiples of 128 (`tc_ok`); int8, small groups and float32 x use `quant_gemv`.
Under TRITON_INTERPRET=1 (no PTX) the same values come from plain Triton integer ops (USE_ASM=False),
so the CPU tests cover everything but the eight asm lines, which the CUDA tests cover.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from spillover.kernels.triton.quant_gemv import TARGET_PROGRAMS, GemvConfig, _finish, code_offset, workspace

STEP_K = 128  # codes of K per step: 16 words (the MMA's K depth) x 8 codes


def _asm(magic: int) -> str:
    """PTX: two int32 words ($8, $9) -> eight registers $0..$7 of 16-bit float pairs (BIAS + code i).

    Byte j of each word holds codes 2j (low nibble) and 2j+1 (high); PRMT puts byte j of the first
    word in bits 0-7 and of the second in bits 16-23, LOP3 keeps one nibble per half and ORs the
    magic exponent in ((a & b) | c = 0xEA). The first word is element 0 of the pack (low half).
    """
    lines = ["{", ".reg .b32 t, s;"]
    for j in range(4):
        sel = j | (j << 4) | ((4 + j) << 8) | ((4 + j) << 12)
        lines += [
            f"prmt.b32 t, $8, $9, {sel:#06x};",
            f"lop3.b32 ${2 * j}, t, 0x000F000F, {magic:#010x}, 0xEA;",
            "shr.u32 s, t, 4;",
            f"lop3.b32 ${2 * j + 1}, s, 0x000F000F, {magic:#010x}, 0xEA;",
        ]
    return "\n".join(lines + ["}"])


_ASM_BF16 = tl.constexpr(_asm(0x43004300))
_ASM_FP16 = tl.constexpr(_asm(0x64006400))
_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,r,r")


@triton.jit
def _gemv_tc_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, eid_ptr, y_ptr, ws_ptr, cnt_ptr,
    N, KW_SPLIT,
    stride_xt, stride_we, stride_wk, stride_se, stride_sg, stride_yt,
    GROUP: tl.constexpr, OFFSET: tl.constexpr, HAS_MINS: tl.constexpr, HAS_EIDS: tl.constexpr,
    IS_FP16: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    BLOCK_W: tl.constexpr = 16  # words per step: the MMA's K depth
    GROUP_W: tl.constexpr = GROUP // 8
    BIAS: tl.constexpr = 1024 if IS_FP16 else 128
    PREC: tl.constexpr = "tf32" if USE_ASM else "ieee"  # tf32 is Triton's default; 16-bit dots ignore it
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(eid_ptr + row).to(tl.int64) if HAS_EIDS else 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_cols = w_ptr + e * stride_we + offs_n[None, :]
    s_cols = s_ptr + e * stride_se + offs_n
    m_cols = m_ptr + e * stride_se + offs_n
    x_row = x_ptr + row * stride_xt
    r = tl.arange(0, BLOCK_W)
    mma_row = tl.arange(0, 16)[:, None]
    # Only MMA row 0 carries x; the others load nothing (zeros), so sum over rows = row 0.
    x_mask = (mma_row == 0) & (r[None, :] >= 0)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)  # sum_g s * (x . (BIAS + q))
    corr = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_g X[g] * (m - (BIAS + OFFSET) * s)
    kw_begin = pid_k * KW_SPLIT
    for kw0 in range(kw_begin, kw_begin + KW_SPLIT, BLOCK_W):
        words = tl.load(w_cols + ((kw0 + r).to(tl.int64) * stride_wk)[:, None], mask=mask_n[None, :],
                        other=0)  # [16, BLOCK_N] int32
        if USE_ASM:
            if IS_FP16:
                q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                    _ASM_FP16, _CONSTRAINTS, [words], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
            else:
                q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                    _ASM_BF16, _CONSTRAINTS, [words], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
        else:  # the interpreter: the same exact values; its 16-bit casts and dots are wrong, so float32
            q0 = ((words & 15) + BIAS).to(tl.float32)
            q1 = (((words >> 4) & 15) + BIAS).to(tl.float32)
            q2 = (((words >> 8) & 15) + BIAS).to(tl.float32)
            q3 = (((words >> 12) & 15) + BIAS).to(tl.float32)
            q4 = (((words >> 16) & 15) + BIAS).to(tl.float32)
            q5 = (((words >> 20) & 15) + BIAS).to(tl.float32)
            q6 = (((words >> 24) & 15) + BIAS).to(tl.float32)
            q7 = (((words >> 28) & 15) + BIAS).to(tl.float32)
        xk = x_row + ((kw0 + r) * 8)[None, :]  # code i of word w is k = 8w + i
        d = tl.dot(tl.load(xk, mask=x_mask, other=0.0).to(q0.dtype), q0, input_precision=PREC)
        d = tl.dot(tl.load(xk + 1, mask=x_mask, other=0.0).to(q0.dtype), q1, d, input_precision=PREC)
        d = tl.dot(tl.load(xk + 2, mask=x_mask, other=0.0).to(q0.dtype), q2, d, input_precision=PREC)
        d = tl.dot(tl.load(xk + 3, mask=x_mask, other=0.0).to(q0.dtype), q3, d, input_precision=PREC)
        d = tl.dot(tl.load(xk + 4, mask=x_mask, other=0.0).to(q0.dtype), q4, d, input_precision=PREC)
        d = tl.dot(tl.load(xk + 5, mask=x_mask, other=0.0).to(q0.dtype), q5, d, input_precision=PREC)
        d = tl.dot(tl.load(xk + 6, mask=x_mask, other=0.0).to(q0.dtype), q6, d, input_precision=PREC)
        d = tl.dot(tl.load(xk + 7, mask=x_mask, other=0.0).to(q0.dtype), q7, d, input_precision=PREC)
        x_sum = tl.sum(tl.load(x_row + kw0 * 8 + tl.arange(0, BLOCK_W * 8)).to(tl.float32))
        g = kw0 // GROUP_W
        s = tl.load(s_cols + g * stride_sg, mask=mask_n, other=0).to(tl.float32)
        acc += d * s[None, :]
        if HAS_MINS:
            m = tl.load(m_cols + g * stride_sg, mask=mask_n, other=0).to(tl.float32)
            corr += x_sum * (m - (BIAS + OFFSET) * s)
        else:
            corr += x_sum * (-(BIAS + OFFSET) * s)
    y_vec = tl.sum(acc, axis=0) + corr
    _finish(y_vec, y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, row, pid_n, pid_k, N, stride_yt, SPLIT_K)


def tc_ok(k: int, bits: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the tensor-core GEMV takes this weight: int4, 16-bit x, 128-value steps in one group."""
    return bits == 4 and dtype in (torch.bfloat16, torch.float16) and k % STEP_K == 0 \
        and group_size % STEP_K == 0


@cache  # pure in its ints, and called for every quantized matmul of a decode step
def tc_config(rows: int, n: int, k: int) -> GemvConfig:
    """128 output channels per program; split-K doubles while the grid stays within TARGET_PROGRAMS."""
    block_n = 128
    split = 1
    tiles = rows * triton.cdiv(n, block_n)
    while split < 8 and tiles * split * 2 <= TARGET_PROGRAMS and k % (STEP_K * split * 2) == 0 \
            and k // (split * 2) >= 2 * STEP_K:
        split *= 2
    return GemvConfig(block_n, STEP_K, split, 4)


def quant_gemv_tc(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """int4 GEMV on the tensor cores, kn layout: words [E, K/8, N] int32, scales/mins [E, K/G, N]."""
    t, k = x.shape
    e, kw, n = words.shape
    assert words.dtype == torch.int32 and kw * 8 == k and x.stride(1) == 1 and words.stride(2) == 1
    assert scales.shape == (e, k // group_size, n) and scales.stride(2) == 1
    if not tc_ok(k, bits, group_size, x.dtype):
        raise ValueError(f"tensor-core GEMV needs int4, bf16/fp16 x and K, group multiples of {STEP_K}; "
                         f"got bits={bits}, x {x.dtype}, K={k}, group {group_size}")
    if mins is not None:
        assert mins.shape == scales.shape and mins.stride() == scales.stride()
    cfg = config or tc_config(t, n, k)
    if cfg.block_k != STEP_K or k % (STEP_K * cfg.split_k):
        raise ValueError(f"K={k} does not split into {cfg.split_k} x {STEP_K}-value steps")
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), t, cfg.split_k)
    ws, cnt = workspace(x.device, cfg.split_k * t * n, grid[0] * t)
    _gemv_tc_kernel[grid](
        x, words, scales, mins if mins is not None else scales,
        expert_ids if expert_ids is not None else x, y, ws, cnt,
        n, kw // cfg.split_k,
        x.stride(0), words.stride(0), words.stride(1), scales.stride(0), scales.stride(1), y.stride(0),
        GROUP=group_size, OFFSET=code_offset(bits, mins is not None), HAS_MINS=mins is not None,
        HAS_EIDS=expert_ids is not None, IS_FP16=x.dtype == torch.float16, USE_ASM=x.device.type == "cuda",
        BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y
