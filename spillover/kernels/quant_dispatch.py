"""The kernel choice for a weight-only quantized matmul (re-exported by `spillover.kernels`).

Choices: `triton_gemv` (CUDA, <= GEMV_MAX_ROWS rows), `triton_int4_mma_gemv` (the same for int4
experts where the tensor-core GEMV is faster: INT4_MMA_*), `triton_gemm` (CUDA, more rows: routed
experts, or a dense weight too large to copy to bf16), `triton_dequant` (CUDA, a dense weight with
more rows: bf16 in one Triton pass, then cuBLAS; FP8 too), `triton_fp8_gemv` / `triton_fp8_gemm`
(FP8 block weights), `fp8_dequant` (FP8 without Triton: torch dequantize + matmul),
`cpu_int4pack` / `cpu_int8pack` (CPU, <= CPU_WOQ_MAX_ROWS rows per expert), `ref` (dequantize +
float matmul: CPU prefill, or no Triton). Each is resolved once per shape class (`QuantShape`) and
logged once with its reason (`select.resolve`). `SPILLOVER_KERNELS=ref|cpu|triton` forces a family
(`triton` on the CPU only works under TRITON_INTERPRET=1; for tests). The Triton int kernels read
the GPU "kn" layout (`GroupedIntWeight.to_layout`); int4 experts that take the tensor-core GEMV are
held "tiled" instead (`gpu_layout`), which that GEMV and the grouped GEMM read. A CPU-resident
format is converted per call (tests only).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import torch

from spillover.kernels import cpu_quant as cpu_kernels
from spillover.kernels.formats import Fp8Weight as Fp8BlockWeight
from spillover.kernels.formats import IntWeight as GroupedIntWeight
from spillover.kernels.ref_quant import quant_matmul_ref
from spillover.kernels.select import has_triton, kernels_mode, resolve, triton_interpreted

# ---- Tuning constants: each with its why and the command that re-derives it --------------------
# (the figures behind them, with card and commit: docs/kernel_notes.md)

# The GEMV re-reads the weight per row; past this many rows a GEMM (or bf16 + cuBLAS) reuses it.
#   no bench isolates it: python bench/quant_gemv.py (GEMV) against python bench/quant_gemm.py
GEMV_MAX_ROWS = 8
# Dense weights past GEMV_MAX_ROWS go bf16 once + cuBLAS; a memory bound on that transient copy.
#   python bench/quant_gemm.py (deq+mm against the GEMM: the speed side)
DEQUANT_MAX_BYTES = 256 << 20
# torch's CPU int4/int8 weight-only ops slow linearly with rows: past this, dequantize + matmul.
#   python bench/quant_gemv.py --cpu times batch 1; time SPILLOVER_KERNELS=cpu against =ref
CPU_WOQ_MAX_ROWS = 4
# CUDA MoE rows up to this skip the host count (a sync per layer): the GEMV beat the GEMM there.
#   python bench/moe_dispatch_rows.py --kinds int4,int8,fp8
SYNC_FREE_ROWS = 1280
# Where the tensor-core int4 GEMV beat the CUDA-core one (g128 experts, sm_90; others unmeasured).
#   python bench/int4_mma_gemv.py --reps 3 (and tests/kernels/test_int4_mma_gemv.py there)
INT4_MMA_CAPABILITIES = ((9, 0),)
INT4_MMA_GROUPS = (128,)
INT4_MMA_K = (512, 2048)

# Triton launch configs live beside their kernels (spillover/kernels/triton/), re-derived by:
#   gemv_config.py default_config, TARGET_PROGRAMS (int and FP8 GEMVs): python bench/quant_gemv.py
#   quant_gemm.py default_gemm_config, TARGET_PROGRAMS: python bench/quant_gemm.py --sweep
#   int4_mma_gemv.py default_mma_config: python bench/int4_mma_gemv.py
#   dequant.py BLOCK_N, BLOCK_W, NUM_WARPS: python bench/quant_gemm.py (its deq+mm rows)
# --------------------------------------------------------------------------------------------------

TILED_KERNELS = ("triton_int4_mma_gemv", "triton_gemm")  # the kernels that read the tiled layout


class QuantShape(NamedTuple):
    """Everything a quantized matmul's kernel choice reads: one choice per value."""

    kind: str  # "int" or "fp8"
    bits: int
    group: int | tuple[int, int]  # int: group size; FP8: block shape
    k: int
    n: int
    act: torch.dtype
    symmetric: bool
    device: str
    capability: tuple[int, int] | None  # CUDA only
    interpreted: bool  # CPU under TRITON_INTERPRET=1
    gemv_rows: bool  # rows <= GEMV_MAX_ROWS
    cpu_rows: bool  # rows <= CPU_WOQ_MAX_ROWS
    moe: bool

    def __str__(self) -> str:
        fmt = f"fp8 {self.group[0]}x{self.group[1]}" if isinstance(self.group, tuple) else (
            f"int{self.bits}{'' if self.symmetric else ' asym'} g{self.group}")
        dev = self.device + (f" sm_{self.capability[0]}{self.capability[1]}" if self.capability
                             else " interpreted" if self.interpreted else "")
        bound = (min if self.gemv_rows and self.cpu_rows else max)(GEMV_MAX_ROWS, CPU_WOQ_MAX_ROWS)
        rows = (f"rows<={bound}" if self.gemv_rows and self.cpu_rows else
                f"rows<={GEMV_MAX_ROWS}" if self.gemv_rows else
                f"rows<={CPU_WOQ_MAX_ROWS}" if self.cpu_rows else f"rows>{bound}")
        act = str(self.act).removeprefix("torch.")
        return f"{fmt} {self.n}x{self.k} {act} {dev} {rows} {'experts' if self.moe else 'dense'}"


def _device_class(device: torch.device) -> tuple[tuple[int, int] | None, bool]:
    if device.type == "cuda":
        return _capability(device), False
    return None, triton_interpreted()


def int_shape(fmt: GroupedIntWeight, device: torch.device, rows: int, moe: bool) -> QuantShape:
    cap, interp = _device_class(device)
    return QuantShape("int", fmt.bits, fmt.group_size, fmt.in_features, fmt.out_features,
                      fmt.act_dtype, fmt.mins is None, device.type, cap, interp,
                      rows <= GEMV_MAX_ROWS, rows <= CPU_WOQ_MAX_ROWS, moe)


def fp8_shape(fmt: Fp8BlockWeight, device: torch.device, rows: int, moe: bool) -> QuantShape:
    cap, interp = _device_class(device)
    n, k = fmt.weight.shape[-2:]
    return QuantShape("fp8", 8, fmt.block_shape, k, n, fmt.act_dtype, True, device.type, cap,
                      interp, rows <= GEMV_MAX_ROWS, rows <= CPU_WOQ_MAX_ROWS, moe)


def busiest_expert_rows(x: torch.Tensor, expert_ids: torch.Tensor | None) -> int:
    """Rows of the busiest expert: what picks GEMV or GEMM (an upper bound where counting would
    cost).

    Counting needs a device-to-host sync, which stalls every MoE layer of a CUDA decode step. Up to
    SYNC_FREE_ROWS rows (a decode batch times top-k, or a prefill chunk of up to 128 tokens, spread
    over hundreds of experts) are answered without counting, as GEMV-sized: the GEMV measured faster
    there for routing spread over the experts. Routing concentrated on a few experts would favour
    the GEMM; it is not counted for.
    """
    rows = x.shape[0]
    if expert_ids is None or rows <= min(CPU_WOQ_MAX_ROWS, GEMV_MAX_ROWS):
        return rows
    if x.device.type == "cuda" and rows <= SYNC_FREE_ROWS:
        return min(rows, GEMV_MAX_ROWS)
    # (a sparse call's rows of expert -1 count as expert 0's: still an upper bound)
    return int(torch.bincount(expert_ids.clamp(min=0)).max().item())


def expert_rows_sorted(device: torch.device, rows: int) -> bool:
    """Whether the grouped matmul that `rows` expert rows take wants them sorted by expert: the
    tiled GEMM does. A GEMV reads each row's expert itself, and the CPU and reference paths
    gather each expert's rows themselves, so those take rows in (token, k) order unsorted."""
    if rows <= (SYNC_FREE_ROWS if device.type == "cuda" else GEMV_MAX_ROWS):
        return False
    return _triton_route(device, kernels_mode()) and has_triton()


def _triton_route(device: torch.device, mode: str) -> bool:
    """CUDA, or Triton forced on the CPU under the interpreter (tests)."""
    return device.type == "cuda" or (mode == "triton" and triton_interpreted())


def int4_mma_fits(fmt: GroupedIntWeight, capability: tuple[int, int], moe: bool) -> bool:
    """Whether a decode GEMV of `fmt` goes to the tensor-core int4 kernel (the shapes above are
    within its own limits, `int4_mma_gemv.unsupported`, and tile into 16 channels; bf16
    activations only)."""
    return (moe and fmt.bits == 4 and capability in INT4_MMA_CAPABILITIES
            and fmt.group_size in INT4_MMA_GROUPS and fmt.in_features in INT4_MMA_K
            and fmt.out_features % 16 == 0 and fmt.act_dtype == torch.bfloat16)


def gpu_layout(fmt: GroupedIntWeight, device: torch.device) -> str:
    """The layout a format holds on a CUDA device: "tiled" for stacked experts that the tensor-core
    GEMV takes there (it and the grouped GEMM read it; the GEMV's loads are contiguous in it), else
    "kn"."""
    fits = has_triton() and int4_mma_fits(fmt, _capability(device), moe=fmt.stacked)
    return "tiled" if fits else "kn"


@cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def choose_kernel(fmt: GroupedIntWeight, device: torch.device, rows: int,
                  moe: bool = False) -> tuple[str, str]:
    """(kernel name, reason) for `rows` rows per expert on `device` (moe: rows pick experts).
    The reason holds for every row count of the same `QuantShape`."""
    mode = kernels_mode()
    if mode == "ref":
        return "ref", "forced by SPILLOVER_KERNELS=ref"
    if _triton_route(device, mode):
        if not has_triton():
            return "ref", "triton not importable"
        if not fmt.kn_ok:
            return "ref", f"K={fmt.in_features} does not pack into int32 words"
        if rows <= GEMV_MAX_ROWS:
            if device.type == "cuda" and int4_mma_fits(fmt, _capability(device), moe):
                return "triton_int4_mma_gemv", (f"<= {GEMV_MAX_ROWS} rows, int4 experts where "
                                                "INT4_MMA_* hold: tensor-core GEMV")
            return "triton_gemv", f"<= {GEMV_MAX_ROWS} rows: bandwidth-bound GEMV"
        from spillover.kernels.triton.quant_gemm import gemm_ok

        if not gemm_ok(fmt.in_features, fmt.bits, fmt.group_size):
            return "triton_gemv", f"K={fmt.in_features} has no 16-word GEMM steps: GEMV per row"
        bf16_bytes = 2 * fmt.out_features * fmt.in_features
        if device.type == "cuda" and not moe and bf16_bytes <= DEQUANT_MAX_BYTES:
            return "triton_dequant", (f"> {GEMV_MAX_ROWS} rows on a dense weight: bf16 once "
                                      "+ cuBLAS")
        return "triton_gemm", f"> {GEMV_MAX_ROWS} rows: tiled GEMM reuses weights"
    if device.type == "cpu" and (rows <= CPU_WOQ_MAX_ROWS or mode == "cpu"):
        why_not = cpu_kernels.int4_cpu_ok(fmt) if fmt.bits == 4 else cpu_kernels.int8_cpu_ok(fmt)
        if why_not is None:
            why = ("forced by SPILLOVER_KERNELS=cpu" if rows > CPU_WOQ_MAX_ROWS
                   else f"<= {CPU_WOQ_MAX_ROWS} rows")
            return f"cpu_int{fmt.bits}pack", f"{why}: torch weight-only op"
        return "ref", why_not
    return "ref", f"> {CPU_WOQ_MAX_ROWS} rows on {device.type}: dequantize + float matmul"


def quant_matmul(fmt: GroupedIntWeight, x: torch.Tensor, expert_ids: torch.Tensor | None,
                 sparse: bool = False) -> torch.Tensor:
    """y [T, N] = x [T, K] @ W[expert_ids[t]].T (W = the only weight when expert_ids is None).
    sparse: rows whose expert id is -1 come out zero (a GEMV reads no weight for them)."""
    x = x.to(fmt.act_dtype) if x.dtype != fmt.act_dtype else x
    if expert_ids is not None and expert_ids.numel() and not fmt.stacked:
        expert_ids = None
    rows = busiest_expert_rows(x, expert_ids)
    moe = expert_ids is not None
    kernel = resolve("quant_matmul", int_shape(fmt, x.device, rows, moe),
                     lambda: choose_kernel(fmt, x.device, rows, moe))
    if kernel.startswith("triton"):
        tiled = fmt.layout == "tiled" and kernel in TILED_KERNELS
        if fmt.layout == "tiled" and not tiled:  # gpu_layout and choose_kernel agree: not reached
            raise RuntimeError(f"{kernel} does not read the tiled layout")
        kn = fmt if tiled else fmt.to_layout("kn")  # no-op on CUDA: formats hold kn or tiled there
        args = (x, kn.qweight, kn.scales, kn.mins, expert_ids)
        if kernel == "triton_dequant":  # dense only
            from spillover.kernels.triton.dequant import dequant_kn

            w16 = dequant_kn(*args[1:4], 0, bits=fmt.bits, group_size=fmt.group_size,
                             out_dtype=x.dtype)
            return torch.nn.functional.linear(x, w16)
        if kernel == "triton_int4_mma_gemv":
            from spillover.kernels.triton.int4_mma_gemv import int4_mma_gemv

            return int4_mma_gemv(*args, bits=fmt.bits, group_size=fmt.group_size, tiled=tiled,
                                 sparse=sparse)
        if kernel == "triton_gemv":
            from spillover.kernels.triton.quant_gemv import quant_gemv

            return quant_gemv(*args, bits=fmt.bits, group_size=fmt.group_size, sparse=sparse)
        if sparse and expert_ids is not None:
            return zero_dead_rows(expert_ids, lambda ids: quant_matmul(fmt, x, ids))
        from spillover.kernels.triton.quant_gemm import quant_gemm

        return quant_gemm(*args, bits=fmt.bits, group_size=fmt.group_size, tiled=tiled)
    if sparse and expert_ids is not None:
        return zero_dead_rows(expert_ids, lambda ids: quant_matmul(fmt, x, ids))
    if kernel.startswith("cpu_"):
        op = cpu_kernels.int4_cpu_matmul if fmt.bits == 4 else cpu_kernels.int8_cpu_matmul
        if expert_ids is None:
            return op(fmt, x, 0)
        return per_expert(x, expert_ids, fmt.out_features, lambda xs, e: op(fmt, xs, e))
    nk = fmt.to_layout("nk")
    return quant_matmul_ref(x, nk.qweight, nk.scales, nk.mins, expert_ids, bits=fmt.bits,
                            group_size=fmt.group_size)


def choose_fp8_kernel(fmt: Fp8BlockWeight, device: torch.device, rows: int,
                      moe: bool = False) -> tuple[str, str]:
    """(kernel name, reason) for an FP8 block weight; as `choose_kernel`."""
    mode = kernels_mode()
    if mode == "ref":
        return "fp8_dequant", "forced by SPILLOVER_KERNELS=ref"
    if not _triton_route(device, mode):
        return "fp8_dequant", f"{device.type}: dequantize the needed weight + float matmul"
    if not has_triton():
        return "fp8_dequant", "triton not importable"
    n, k = fmt.weight.shape[-2:]
    if k % fmt.block:
        return "fp8_dequant", f"K={k} is not a multiple of the block {fmt.block}"
    if rows <= GEMV_MAX_ROWS:
        return "triton_fp8_gemv", f"<= {GEMV_MAX_ROWS} rows: FP8 bytes read directly"
    from spillover.kernels.triton.quant_gemm import gemm_ok

    if not gemm_ok(k, 8, fmt.block):
        return "fp8_dequant", f"K={k} has no 16-word GEMM steps: dequantize + float matmul"
    if device.type == "cuda" and not moe and 2 * n * k <= DEQUANT_MAX_BYTES:
        return "triton_dequant", f"> {GEMV_MAX_ROWS} rows on a dense weight: bf16 once + cuBLAS"
    return "triton_fp8_gemm", f"> {GEMV_MAX_ROWS} rows: tiled GEMM reads the FP8 bytes"


def fp8_matmul(fmt: Fp8BlockWeight, x: torch.Tensor,
               expert_ids: torch.Tensor | None) -> torch.Tensor:
    """y [T, N] = x [T, K] @ W[expert_ids[t]].T for an FP8 block weight (dense when ids is None)."""
    x = x.to(fmt.act_dtype) if x.dtype != fmt.act_dtype else x
    if expert_ids is not None and not fmt.stacked:
        expert_ids = None
    rows = busiest_expert_rows(x, expert_ids)
    moe = expert_ids is not None
    kernel = resolve("fp8_matmul", fp8_shape(fmt, x.device, rows, moe),
                     lambda: choose_fp8_kernel(fmt, x.device, rows, moe))
    weight, scale = fmt.stacked_views()
    if kernel == "triton_fp8_gemv":
        from spillover.kernels.triton.fp8_gemv import fp8_gemv

        return fp8_gemv(x, weight, scale, expert_ids, block=fmt.block_shape)
    if kernel == "triton_fp8_gemm":
        from spillover.kernels.triton.quant_gemm import fp8_gemm

        return fp8_gemm(x, weight, scale, expert_ids, block=fmt.block_shape)
    if kernel == "triton_dequant":  # dense only
        from spillover.kernels.triton.dequant import dequant_fp8

        w16 = dequant_fp8(weight[0], scale[0], fmt.block_shape, x.dtype)
        return torch.nn.functional.linear(x, w16)
    if expert_ids is None:
        return torch.nn.functional.linear(x, fmt.dequantize().to(x.dtype))
    return per_expert(x, expert_ids, weight.shape[1],
                      lambda xs, e: torch.nn.functional.linear(xs, fmt.dequantize(e).to(x.dtype)))


def zero_dead_rows(expert_ids: torch.Tensor,
                   run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A sparse call on a path that reads every row's expert: rows of expert -1 run as expert 0
    and are zeroed after."""
    y = run(expert_ids.clamp(min=0))
    return y * (expert_ids >= 0).unsqueeze(1).to(y.dtype)


def per_expert(x: torch.Tensor, expert_ids: torch.Tensor, n_out: int,
               matmul: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """y [T, n_out]: the rows of each routed expert through `matmul(rows, expert)` (paths with no
    grouped kernel)."""
    y = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    for e in torch.unique(expert_ids).tolist():
        sel = (expert_ids == e).nonzero().squeeze(1)
        y[sel] = matmul(x[sel], e)
    return y
