"""Prefill (many rows) with quantized weights: the Triton grouped GEMM against dequantize + cuBLAS.

    python bench/quant_gemm.py            # GPU: correctness vs the torch reference, timings
    python bench/quant_gemm.py --kinds fp8

Rows: `dense 4096x4096` at M rows, and `moe 1024x2048 (w13)` / `moe 2048x512 (w2)` for T tokens,
each routed to 10 of 512 experts (Qwen3-Next), so T x 10 rows over up to 512 experts. Variants:
- `triton`: the grouped GEMM (`kernels/triton/quant_gemm.py`; FP8 reads its e4m3 bytes directly);
- `dequant`: what the dispatcher did for FP8 before the GEMM existed, and still does for int where
  the GEMM cannot take K: dequantize the weight (for MoE each routed expert, one matmul each) to
  bf16, then torch's matmul;
- `deq+mm`: the weight dequantized to bf16 by the Triton kernel (`kernels/triton/dequant.py`, one
  pass), then torch's matmul: what the dispatcher does for a dense weight past GEMV_MAX_ROWS rows
  (dense only; the `(deq)` row times the dequantization alone);
- `bf16`: F.linear on an already-bf16 weight (dense only), the cuBLAS ceiling;
- `best ...` (--sweep): the fastest GEMM tile of a sweep, against the default one.
Times are per call from CUDA events over --reps calls after a warm-up (launches included: the MoE
`dequant` path has a host sync and a launch per expert by design). GB/s counts the quantized weight
bytes a call touches (for MoE, the routed experts only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from quant_gemv import reference  # noqa: E402  (bench/quant_gemv.py: a format's float32 reference)

from spillover.kernels.quant_dispatch import per_expert  # noqa: E402
from spillover.kernels.triton.quant_gemm import GemmConfig  # noqa: E402
from spillover.quant import Fp8BlockWeight, Int4Weight, Int8Weight  # noqa: E402
from spillover.quant.grouped import GroupedIntWeight  # noqa: E402

Fmt = GroupedIntWeight | Fp8BlockWeight
EXPERTS, TOP_K = 512, 10


def make(kind: str, e: int, n: int, k: int) -> Fmt:
    """e = 0: one dense [N, K] weight; else a bank of e experts."""
    w = torch.randn(max(e, 1), n, k, device="cuda") * 0.02
    if kind == "fp8":
        return Fp8BlockWeight.pack(w if e else w[0], act_dtype=torch.bfloat16)
    fmt = Int4Weight.pack(w, 128, False, act_dtype=torch.bfloat16) if kind == "int4" else \
        Int8Weight.pack(w, act_dtype=torch.bfloat16)
    fmt.stacked = e > 0
    return fmt.to_layout("kn")


def expert_bytes(fmt: Fmt) -> int:
    """Bytes of one expert (or of the dense weight)."""
    if isinstance(fmt, Fp8BlockWeight):
        w, s = fmt.stacked_views()
        return w[0].numel() + s[0].numel() * 4
    parts = [fmt.qweight[0], fmt.scales[0]] + ([fmt.mins[0]] if fmt.mins is not None else [])
    return sum(t.numel() * t.element_size() for t in parts)


def triton_call(fmt: Fmt, x: torch.Tensor, ids: torch.Tensor | None, cfg: GemmConfig | None = None
                ) -> Callable[[], torch.Tensor]:
    from spillover.kernels.triton.quant_gemm import fp8_gemm, quant_gemm

    if isinstance(fmt, Fp8BlockWeight):
        w, s = fmt.stacked_views()
        return partial(fp8_gemm, x, w, s, ids, block=fmt.block_shape, config=cfg)
    return partial(quant_gemm, x, fmt.qweight, fmt.scales, fmt.mins, ids, bits=fmt.bits,
                   group_size=fmt.group_size, config=cfg)


def dequant_call(fmt: Fmt, x: torch.Tensor, ids: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    if ids is None:
        return lambda: F.linear(x, fmt.dequantize(0 if fmt.stacked else None).to(x.dtype))
    n = fmt.weight.shape[1] if isinstance(fmt, Fp8BlockWeight) else fmt.out_features
    return lambda: per_expert(x, ids, n, lambda xs, e: F.linear(xs, fmt.dequantize(e).to(x.dtype)))


def triton_dequant(fmt: Fmt, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """The dense weight to `dtype` in one Triton pass (`kernels/triton/dequant.py`)."""
    from spillover.kernels.triton.dequant import dequant_fp8, dequant_kn

    if isinstance(fmt, Fp8BlockWeight):
        w, s = fmt.stacked_views()
        return partial(dequant_fp8, w[0], s[0], fmt.block_shape, dtype)
    return partial(dequant_kn, fmt.qweight, fmt.scales, fmt.mins, 0, bits=fmt.bits,
                   group_size=fmt.group_size, out_dtype=dtype)


def timed(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


SWEEP = [GemmConfig(bm, bn, bw, w) for bm in (16, 32, 64) for bn in (32, 64, 128) for bw in (16, 32)
         for w in (4, 8)]


def run_case(kind: str, label: str, fmt: Fmt, x: torch.Tensor, ids: torch.Tensor | None, reps: int,
             sweep: bool) -> None:
    ref = reference(fmt, x, ids)
    touched = 1 if ids is None else int(torch.unique(ids).numel())
    nbytes = expert_bytes(fmt) * touched
    n = ref.shape[1]
    flops = 2 * x.shape[0] * x.shape[1] * n
    variants = {"triton": triton_call(fmt, x, ids), "dequant": dequant_call(fmt, x, ids)}
    if ids is None:
        w16 = fmt.dequantize(0 if fmt.stacked else None).to(torch.bfloat16)
        deq = triton_dequant(fmt, x.dtype)
        deq_err = float((deq().float() - w16.float()).abs().max() / w16.float().abs().max())
        t = timed(deq, reps)
        moved = nbytes + w16.numel() * 2
        print(f"{kind:5s} {label:34s} {'(deq)':8s} {t * 1e6:9.1f} us  Triton dequantize "
              f"alone, {moved / t / 1e9:.0f} GB/s read + written, rel err vs the format's "
              f"own {deq_err:.1e}")
        variants["deq+mm"] = lambda: F.linear(x, deq())
        variants["bf16"] = partial(F.linear, x, w16)
    if sweep:
        best = min((timed(triton_call(fmt, x, ids, c), 5), c) for c in SWEEP)
        variants[f"best {best[1]}"] = triton_call(fmt, x, ids, best[1])
    # the host-side grouping every grouped call pays (argsort, counts: device syncs)
    if ids is not None:
        from spillover.kernels.triton.quant_gemm import align_rows

        t = timed(partial(align_rows, ids, x.shape[0], 16, x.device), reps)
        print(f"{kind:5s} {label:34s} {'(group)':8s} {t * 1e6:9.1f} us  align_rows alone, "
              "part of `triton`")
    for name, fn in variants.items():
        out = fn()
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        t = timed(fn, reps)
        print(f"{kind:5s} {label:34s} {name:8s} {t * 1e6:9.1f} us {flops / t / 1e12:7.1f} TFLOP/s "
              f"{nbytes / t / 1e9:7.0f} GB/s  rel err {err:.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="fp8,int4,int8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also the best of a tile sweep")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kind in args.kinds.split(","):
        dense = make(kind, 0, 4096, 4096)
        for m in (16, 128, 512, 2048):
            x = torch.randn(m, 4096, device="cuda", generator=gen).to(torch.bfloat16)
            run_case(kind, f"dense 4096x4096 M={m}", dense, x, None, args.reps, args.sweep)
        for n, k, tag in ((1024, 2048, "w13"), (2048, 512, "w2")):
            bank = make(kind, EXPERTS, n, k)
            for tokens in (16, 128, 512):
                ids = torch.stack([torch.randperm(EXPERTS, device="cuda", generator=gen)[:TOP_K]
                                   for _ in range(tokens)]).flatten().to(torch.int32)
                x = torch.randn(ids.numel(), k, device="cuda", generator=gen).to(torch.bfloat16)
                run_case(kind, f"moe {n}x{k} ({tag}) T={tokens}", bank, x, ids, args.reps,
                         args.sweep)
            del bank


if __name__ == "__main__":
    main()
