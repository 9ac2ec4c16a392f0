"""The one place that picks the kernel for a weight-only quantized matmul, and logs why.

Choices: `triton_gemv` (CUDA, <= GEMV_MAX_ROWS rows), `triton_int4_mma_gemv` (the same for int4
experts on Hopper, where the tensor-core GEMV measured faster), `triton_gemm` (CUDA, more rows:
routed experts, or a dense weight too large to copy to bf16), `triton_dequant` (CUDA, a dense weight
with more rows: bf16 in one Triton pass, then cuBLAS; FP8 too), `triton_fp8_gemv` / `triton_fp8_gemm`
(FP8 block weights), `fp8_dequant` (FP8 without Triton: torch dequantize + matmul), `cpu_int4pack` /
`cpu_int8pack` (CPU, <= CPU_WOQ_MAX_ROWS rows per expert), `ref` (dequantize + float matmul: CPU
prefill, or no Triton). `SPILLOVER_QUANT_KERNEL=ref|cpu|triton` forces a family (triton on the CPU
only works under TRITON_INTERPRET=1; for tests). The Triton int kernels read the
GPU "kn" layout (`GroupedIntWeight.to_layout`); int4 experts that take the tensor-core GEMV are held
"tiled" instead (`gpu_layout`), which that GEMV and the grouped GEMM read. A CPU-resident format is
converted per call (tests only).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from functools import cache

import torch

from spillover.kernels import cpu_quant as cpu_kernels
from spillover.kernels import triton_interpreted
from spillover.kernels.formats import Fp8Weight as Fp8BlockWeight
from spillover.kernels.formats import IntWeight as GroupedIntWeight
from spillover.kernels.ref_quant import quant_matmul_ref

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 8  # GEMV re-reads weights per row; beyond this a tiled GEMM wins
# A dense weight with more than GEMV_MAX_ROWS rows is dequantized to bf16 in one Triton pass and handed
# to cuBLAS: on a 4096x4096 weight (H100, bench/quant_gemm.py) that beat the grouped GEMM's small
# dequantized tiles at every row count measured, 16 to 2048 (int4 152 vs 179 us at 16 rows, 133 vs
# 1739 us at 2048). Unless its bf16 copy would pass DEQUANT_MAX_BYTES (a transient allocation): then
# the GEMM. Routed experts always take the grouped GEMM: one dequantize + matmul per expert was
# 25-1000x slower.
DEQUANT_MAX_BYTES = 256 << 20
CPU_WOQ_MAX_ROWS = 4  # torch's CPU int4/int8 ops scale linearly with M; bf16 GEMM wins from M ~ 16


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _log_choice(kernel: str, reason: str) -> None:
    log.info("quant kernel = %s (%s)", kernel, reason)


# CUDA MoE batches up to this many (token, expert) rows skip the count and take the GEMV: there the
# per-row GEMV beat the grouped GEMM with routing spread over 512 experts, for int4 (tensor-core GEMV
# on tiled words), int8 and FP8 alike (H100, Qwen3-Next w13/w2, T = 4-128 tokens x top-10: 1.7-6.4x;
# for tiled int4 w13 the GEMM won at 2560 rows): BENCHMARKS.md "MoE GEMV against the grouped GEMM",
# "tiled word layout", "int8 and FP8 experts"
SYNC_FREE_ROWS = 1280


def busiest_expert_rows(x: torch.Tensor, expert_ids: torch.Tensor | None) -> int:
    """Rows of the busiest expert: what picks GEMV or GEMM (an upper bound where counting would cost).

    Counting needs a device-to-host sync, which stalls every MoE layer of a CUDA decode step. Up to
    SYNC_FREE_ROWS rows (a decode batch times top-k, or a prefill chunk of up to 128 tokens, spread
    over hundreds of experts) are answered without counting, as GEMV-sized: the GEMV measured faster
    there for routing spread over the experts. Routing concentrated on a few experts would favour the
    GEMM; it is not counted for.
    """
    rows = x.shape[0]
    if expert_ids is None or rows <= min(CPU_WOQ_MAX_ROWS, GEMV_MAX_ROWS):
        return rows
    if x.device.type == "cuda" and rows <= SYNC_FREE_ROWS:
        return min(rows, GEMV_MAX_ROWS)
    return int(torch.bincount(expert_ids).max().item())


def _forced() -> str:
    return os.environ.get("SPILLOVER_QUANT_KERNEL", "")


def _triton_route(device: torch.device) -> bool:
    """CUDA, or Triton forced on the CPU under the interpreter (tests)."""
    return device.type == "cuda" or (_forced() == "triton" and triton_interpreted())


# The tensor-core int4 GEMV beat the CUDA-core one for int4 experts, measured on sm_90 (H100, H200:
# bench/int4_mma_gemv.py, g128, Qwen3-Next's expert shapes: K = 2048 (w13; asymmetric +14-16 %,
# symmetric +16-20 % with its register cap) and 512 (w2, +4-7 % asymmetric, +1-7 % symmetric)); on tiled
# words (`gpu_layout`) it takes 7-16 % less time again (BENCHMARKS.md "tiled word layout"). Other GPUs,
# groups and K keep the CUDA-core GEMV until tests/kernels/test_int4_mma_gemv.py and the bench have run there.
INT4_MMA_CAPABILITIES = ((9, 0),)
INT4_MMA_GROUPS = (128,)
INT4_MMA_K = (512, 2048)


def int4_mma_fits(fmt: GroupedIntWeight, capability: tuple[int, int], moe: bool) -> bool:
    """Whether a decode GEMV of `fmt` goes to the tensor-core int4 kernel (the shapes above are
    within its own limits, `int4_mma_gemv.unsupported`, and tile into 16 channels; bf16 activations only)."""
    return (moe and fmt.bits == 4 and capability in INT4_MMA_CAPABILITIES
            and fmt.group_size in INT4_MMA_GROUPS and fmt.in_features in INT4_MMA_K
            and fmt.out_features % 16 == 0 and fmt.act_dtype == torch.bfloat16)


def gpu_layout(fmt: GroupedIntWeight, device: torch.device) -> str:
    """The layout a format holds on a CUDA device: "tiled" for stacked experts that the tensor-core
    GEMV takes there (it and the grouped GEMM read it; the GEMV's loads are contiguous in it), else "kn"."""
    fits = triton_available() and int4_mma_fits(fmt, _capability(device), moe=fmt.stacked)
    return "tiled" if fits else "kn"


TILED_KERNELS = ("triton_int4_mma_gemv", "triton_gemm")  # the kernels that read the tiled layout


@cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def choose_kernel(fmt: GroupedIntWeight, device: torch.device, rows: int, moe: bool = False) -> tuple[str, str]:
    """(kernel name, reason) for `rows` rows per expert on `device` (moe: rows pick experts)."""
    forced = _forced()
    if forced == "ref":
        return "ref", "forced by SPILLOVER_QUANT_KERNEL"
    if _triton_route(device):
        if not triton_available():
            return "ref", "triton not importable"
        if not fmt.kn_ok:
            return "ref", f"K={fmt.in_features} does not pack into int32 words"
        if rows <= GEMV_MAX_ROWS:
            if device.type == "cuda" and int4_mma_fits(fmt, _capability(device), moe):
                return "triton_int4_mma_gemv", (f"{rows} rows <= {GEMV_MAX_ROWS}, int4 experts on "
                                                "sm_90: tensor-core GEMV")
            return "triton_gemv", f"{rows} rows <= {GEMV_MAX_ROWS}: bandwidth-bound GEMV"
        from spillover.kernels.triton.quant_gemm import gemm_ok

        if not gemm_ok(fmt.in_features, fmt.bits, fmt.group_size):
            return "triton_gemv", f"K={fmt.in_features} has no 16-word GEMM steps: GEMV per row"
        if device.type == "cuda" and not moe and 2 * fmt.out_features * fmt.in_features <= DEQUANT_MAX_BYTES:
            return "triton_dequant", f"{rows} rows > {GEMV_MAX_ROWS} on a dense weight: bf16 once + cuBLAS"
        return "triton_gemm", f"{rows} rows > {GEMV_MAX_ROWS}: tiled GEMM reuses weights"
    if device.type == "cpu" and (rows <= CPU_WOQ_MAX_ROWS or forced == "cpu"):
        why_not = cpu_kernels.int4_cpu_ok(fmt) if fmt.bits == 4 else cpu_kernels.int8_cpu_ok(fmt)
        if why_not is None:
            return f"cpu_int{fmt.bits}pack", f"{rows} rows <= {CPU_WOQ_MAX_ROWS}: torch weight-only op"
        return "ref", why_not
    return "ref", f"{rows} rows on {device.type}: dequantize + float matmul"


def quant_matmul(fmt: GroupedIntWeight, x: torch.Tensor, expert_ids: torch.Tensor | None) -> torch.Tensor:
    """y [T, N] = x [T, K] @ W[expert_ids[t]].T (W = the only weight when expert_ids is None)."""
    x = x.to(fmt.act_dtype) if x.dtype != fmt.act_dtype else x
    if expert_ids is not None and expert_ids.numel() and not fmt.stacked:
        expert_ids = None
    rows = busiest_expert_rows(x, expert_ids)
    kernel, reason = choose_kernel(fmt, x.device, rows, moe=expert_ids is not None)
    _log_choice(kernel, reason)
    if kernel.startswith("triton"):
        tiled = fmt.layout == "tiled" and kernel in TILED_KERNELS
        if fmt.layout == "tiled" and not tiled:  # gpu_layout and choose_kernel agree: not reached
            raise RuntimeError(f"{kernel} does not read the tiled layout ({reason})")
        kn = fmt if tiled else fmt.to_layout("kn")  # a no-op on CUDA, where formats hold kn or tiled
        args = (x, kn.qweight, kn.scales, kn.mins, expert_ids)
        if kernel == "triton_dequant":  # dense only
            from spillover.kernels.triton.dequant import dequant_kn

            w16 = dequant_kn(*args[1:4], 0, bits=fmt.bits, group_size=fmt.group_size, out_dtype=x.dtype)
            return torch.nn.functional.linear(x, w16)
        if kernel == "triton_int4_mma_gemv":
            from spillover.kernels.triton.int4_mma_gemv import int4_mma_gemv

            return int4_mma_gemv(*args, bits=fmt.bits, group_size=fmt.group_size, tiled=tiled)
        if kernel == "triton_gemv":
            from spillover.kernels.triton.quant_gemv import quant_gemv

            return quant_gemv(*args, bits=fmt.bits, group_size=fmt.group_size)
        from spillover.kernels.triton.quant_gemm import quant_gemm

        return quant_gemm(*args, bits=fmt.bits, group_size=fmt.group_size, tiled=tiled)
    if kernel.startswith("cpu_"):
        op = cpu_kernels.int4_cpu_matmul if fmt.bits == 4 else cpu_kernels.int8_cpu_matmul
        if expert_ids is None:
            return op(fmt, x, 0)
        return per_expert(x, expert_ids, fmt.out_features, lambda xs, e: op(fmt, xs, e))
    nk = fmt.to_layout("nk")
    return quant_matmul_ref(x, nk.qweight, nk.scales, nk.mins, expert_ids, bits=fmt.bits,
                            group_size=fmt.group_size)


def choose_fp8_kernel(fmt: Fp8BlockWeight, device: torch.device, rows: int, moe: bool = False) -> tuple[str, str]:
    if _forced() == "ref" or not _triton_route(device):
        return "fp8_dequant", f"{device.type}: dequantize the needed weight + float matmul"
    if not triton_available():
        return "fp8_dequant", "triton not importable"
    if fmt.weight.shape[-1] % fmt.block:
        return "fp8_dequant", f"K={fmt.weight.shape[-1]} is not a multiple of the block {fmt.block}"
    if rows <= GEMV_MAX_ROWS:
        return "triton_fp8_gemv", f"{rows} rows <= {GEMV_MAX_ROWS}: FP8 bytes read directly"
    from spillover.kernels.triton.quant_gemm import gemm_ok

    if not gemm_ok(fmt.weight.shape[-1], 8, fmt.block):
        return "fp8_dequant", f"K={fmt.weight.shape[-1]} has no 16-word GEMM steps: dequantize + float matmul"
    if device.type == "cuda" and not moe and 2 * fmt.weight.shape[-2] * fmt.weight.shape[-1] <= DEQUANT_MAX_BYTES:
        return "triton_dequant", f"{rows} rows > {GEMV_MAX_ROWS} on a dense weight: bf16 once + cuBLAS"
    return "triton_fp8_gemm", f"{rows} rows > {GEMV_MAX_ROWS}: tiled GEMM reads the FP8 bytes"


def fp8_matmul(fmt: Fp8BlockWeight, x: torch.Tensor, expert_ids: torch.Tensor | None) -> torch.Tensor:
    """y [T, N] = x [T, K] @ W[expert_ids[t]].T for an FP8 block weight (dense when ids is None)."""
    x = x.to(fmt.act_dtype) if x.dtype != fmt.act_dtype else x
    if expert_ids is not None and not fmt.stacked:
        expert_ids = None
    rows = busiest_expert_rows(x, expert_ids)
    kernel, reason = choose_fp8_kernel(fmt, x.device, rows, moe=expert_ids is not None)
    _log_choice(kernel, reason)
    weight, scale = fmt.stacked_views()
    if kernel == "triton_fp8_gemv":
        from spillover.kernels.triton.fp8_gemv import fp8_gemv

        return fp8_gemv(x, weight, scale, expert_ids, block=fmt.block_shape)
    if kernel == "triton_fp8_gemm":
        from spillover.kernels.triton.quant_gemm import fp8_gemm

        return fp8_gemm(x, weight, scale, expert_ids, block=fmt.block_shape)
    if kernel == "triton_dequant":  # dense only
        from spillover.kernels.triton.dequant import dequant_fp8

        return torch.nn.functional.linear(x, dequant_fp8(weight[0], scale[0], fmt.block_shape, x.dtype))
    if expert_ids is None:
        return torch.nn.functional.linear(x, fmt.dequantize().to(x.dtype))
    return per_expert(x, expert_ids, weight.shape[1],
                      lambda xs, e: torch.nn.functional.linear(xs, fmt.dequantize(e).to(x.dtype)))


def per_expert(x: torch.Tensor, expert_ids: torch.Tensor, n_out: int,
               matmul: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """y [T, n_out]: the rows of each routed expert through `matmul(rows, expert)` (paths with no grouped kernel)."""
    y = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    for e in torch.unique(expert_ids).tolist():
        sel = (expert_ids == e).nonzero().squeeze(1)
        y[sel] = matmul(x[sel], e)
    return y
