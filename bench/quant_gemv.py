"""Weight-only GEMV at batch 1 (int4, int8, FP8 block): correctness against torch, bandwidth.

    python bench/quant_gemv.py             # GPU: real shapes, default config + best of a sweep
    python bench/quant_gemv.py --no-sweep  # GPU: default (heuristic) configs only
    python bench/quant_gemv.py --kinds int4,bf16  # GPU: some formats only
    python bench/quant_gemv.py --cpu       # dry run: Triton interpreter, small shapes + CPU ops

Rows: `dense NxK` (one weight, x [1, K]) and `moe 10/512 NxK` (x [10, K], each row to a different
expert of a stacked [512, N, K] bank: one decode token with Qwen3-Next's top-10 of 512 routing).
Bytes counted = codes + scales (+ mins) actually read + activations + output. Every timed call runs
on a different weight copy (or expert set) so that L2 cannot serve it; calls are replayed from a
CUDA graph so launch latency is not measured (split-K's reduction kernels are included). Three
references: `copy` (device-to-device memcpy, read + write bytes), `read` (a 1 GiB sum) and `%rd@sz`,
the best plain read of the row's own byte count in the same harness (`read_at`: torch sum or a
one-load-per-program Triton sum, swept): the ceiling a kernel of that size can reach, fixed costs
in. On sm_90+ the int and FP8 GEMVs use programmatic dependent launch (PDL): in a chain of calls,
each one's programs start while the previous one finishes and load their first weights before
waiting for it. The `no-pdl` row is the same config launched plainly; `read+pdl` is the plain read
chained the same way (its fixed costs overlap too), what a chained kernel of that size can reach.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from spillover.kernels.ref_quant import fp8_matmul_ref, quant_matmul_kn_ref  # noqa: E402
from spillover.kernels.triton.quant_gemv import GemvConfig, gdc_launch_dependents, gdc_wait  # noqa: E402
from spillover.quant import Fp8BlockWeight, Int4Weight, Int8Weight  # noqa: E402
from spillover.quant.grouped import GroupedIntWeight  # noqa: E402


def sweep_configs(kind: str) -> list[GemvConfig]:
    """Around the defaults: int (kn layout) 16-32 channels, 256-2048 codes a step, split 1-2, 4-16
    warps (16 with 64 registers; bench_case drops those that leave a step unrolled past 8 times);
    FP8 (nk layout) 128 codes a step."""
    if kind == "fp8":
        return [GemvConfig(bn, 128, sk, 4) for bn in (16, 32, 64) for sk in (1, 2, 4, 8)]
    bks = (512, 1024, 2048) if kind.startswith("int4") else (256, 512, 1024)
    return [GemvConfig(bn, bk, sk, w, max_regs=64 if w >= 16 else None)
            for bn in (16, 32) for bk in bks for sk in (1, 2) for w in (4, 8, 16)]


Fmt = GroupedIntWeight | Fp8BlockWeight


def make(kind: str, e: int, n: int, k: int, device: str) -> Fmt:
    """kind: int4 (asymmetric g128, what --quant int4 uses) | int4sym | int8 (per channel) | fp8."""
    w = torch.randn(e, n, k, device=device) * 0.02
    fmt: Fmt
    if kind == "fp8":
        return Fp8BlockWeight.pack(w, act_dtype=torch.bfloat16)
    if kind.startswith("int4"):
        fmt = Int4Weight.pack(w, 128, kind == "int4sym", act_dtype=torch.bfloat16)
    else:
        fmt = Int8Weight.pack(w, act_dtype=torch.bfloat16)
    return fmt.to_layout("kn")  # what GroupedIntWeight.to("cuda") holds


def weight_bytes(fmt: Fmt, experts: int) -> int:
    """Bytes one call reads for `experts` experts: codes + scales (+ mins)."""
    if isinstance(fmt, Fp8BlockWeight):
        return (fmt.weight[0].numel() + fmt.scale[0].numel() * 4) * experts
    parts = [fmt.qweight[0], fmt.scales[0]] + ([fmt.mins[0]] if fmt.mins is not None else [])
    return sum(t.numel() * t.element_size() for t in parts) * experts


def gpu_time(fn_per_copy: list[Callable[[], object]], reps: int = 20) -> float:
    """Seconds per call, from a CUDA graph that runs every callable once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_per_copy:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_per_copy:
            f()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps / len(fn_per_copy)


def bandwidths() -> tuple[float, float]:
    """(device-to-device copy GB/s counting read + write, read-only GB/s of a 1 GiB sum)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t_copy = gpu_time([lambda: dst.copy_(src)], reps=10)
    t_read = gpu_time([lambda: src.sum()], reps=10)
    return 2 * (1 << 30) / t_copy / 1e9, (1 << 30) / t_read / 1e9


def call(fmt: Fmt, x: torch.Tensor, ids: torch.Tensor | None, cfg: GemvConfig | None
         ) -> Callable[[], torch.Tensor]:
    from spillover.kernels.triton.fp8_gemv import fp8_gemv
    from spillover.kernels.triton.quant_gemv import quant_gemv

    if isinstance(fmt, Fp8BlockWeight):
        w, s = fmt.stacked_views()
        return partial(fp8_gemv, x, w, s, ids, block=fmt.block, config=cfg)
    return partial(quant_gemv, x, fmt.qweight, fmt.scales, fmt.mins, ids, bits=fmt.bits,
                   group_size=fmt.group_size, config=cfg)


def reference(fmt: Fmt, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    if isinstance(fmt, Fp8BlockWeight):
        w, s = fmt.stacked_views()
        return fp8_matmul_ref(x.float(), w, s, ids, block=fmt.block_shape)
    return quant_matmul_kn_ref(x.float(), fmt.qweight, fmt.scales, fmt.mins, ids, bits=fmt.bits,
                               group_size=fmt.group_size)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


CASES = [  # label, experts in the bank, N, K, rows
    ("dense 4096x4096", 1, 4096, 4096, 1),
    ("dense 8192x8192", 1, 8192, 8192, 1),
    ("dense 1024x2048 (w13)", 1, 1024, 2048, 1),
    ("dense 2048x512 (w2)", 1, 2048, 512, 1),
    ("moe 10/512 1024x2048 (w13)", 512, 1024, 2048, 10),
    ("moe 10/512 2048x512 (w2)", 512, 2048, 512, 10),
]


def setup(kind: str, e: int, n: int, k: int, rows: int
          ) -> tuple[list[Fmt], list[torch.Tensor | None], torch.Tensor]:
    if e == 1:  # distinct weight copies, >= 256 MB in all, so each call misses L2
        one = make(kind, 1, n, k, "cuda")
        copies = max(2, (256 << 20) // max(1, weight_bytes(one, 1)))
        fmts = [one] + [make(kind, 1, n, k, "cuda") for _ in range(copies - 1)]
        for f in fmts:
            if isinstance(f, GroupedIntWeight):
                f.stacked = False
        return fmts, [None] * copies, torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    # one bank of 512 experts (Qwen3-Next's count), a different random expert set per call
    copies = 32
    bank = make(kind, e, n, k, "cuda")
    id_sets: list[torch.Tensor | None] = [torch.randperm(e, device="cuda")[:rows].to(torch.int32)
                                          for _ in range(copies)]
    return [bank] * copies, id_sets, torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)


@triton.jit
def _read_kernel(src, out, n, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    tl.store(out + tl.program_id(0), tl.sum(tl.load(src + offs, mask=offs < n, other=0.0)))


@triton.jit
def _read_kernel_pdl(src, out, n, CHUNK: tl.constexpr):
    gdc_launch_dependents()
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    total = tl.sum(tl.load(src + offs, mask=offs < n, other=0.0))
    gdc_wait()  # `out` may still be read by the previous kernel
    tl.store(out + tl.program_id(0), total)


def read_at(nbytes: int, pdl: bool = False) -> float:
    """GB/s of the best read-only pass over `nbytes` (torch `sum`, or a Triton kernel where each
    program sums one chunk, chunk and warps swept), on distinct buffers like the GEMV rows: what a
    plain read of this size reaches in this harness, fixed costs included."""
    copies = max(2, (256 << 20) // nbytes)
    n = nbytes // 4
    bufs = [torch.empty(n, dtype=torch.float32, device="cuda").normal_() for _ in range(copies)]
    best = float("inf") if pdl else gpu_time([b.sum for b in bufs])  # torch's sum has no PDL
    kernel, launch = (_read_kernel_pdl, {"launch_pdl": True}) if pdl else (_read_kernel, {})
    for chunk in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            grid = (triton.cdiv(n, chunk),)
            out = torch.empty(grid[0], device="cuda")
            fns = [partial(kernel[grid], b, out, n, CHUNK=chunk, num_warps=warps, **launch)
                   for b in bufs]
            best = min(best, gpu_time(fns))
    return nbytes / best / 1e9


def bench_case(kind: str, label: str, e: int, n: int, k: int, rows: int, bw: tuple[float, float],
               sweep: bool) -> None:
    from spillover.kernels.triton.quant_gemv import default_config, pdl_supported

    fmts, id_sets, x = setup(kind, e, n, k, rows)
    nbytes = weight_bytes(fmts[0], rows) + x.numel() * 2 + rows * n * 2
    read_here = read_at(nbytes)
    bits = 4 if kind.startswith("int4") else 8
    ref = reference(fmts[0], x, id_sets[0])

    def time_cfg(cfg: GemvConfig, reps: int = 20) -> float:
        return gpu_time([call(f, x, ids, cfg) for f, ids in zip(fmts, id_sets, strict=True)],
                        reps=reps)

    def row(tag: str, cfg: GemvConfig) -> None:
        err = rel_err(call(fmts[0], x, id_sets[0], cfg)(), ref)
        t = time_cfg(cfg)
        gbs = nbytes / t / 1e9
        print(f"{kind:7s} {label:28s} {tag:7s} {t * 1e6:8.2f} {gbs:7.0f} {100 * gbs / bw[0]:6.1f} "
              f"{100 * gbs / bw[1]:6.1f} {100 * gbs / read_here:6.1f}  {cfg}; rel err {err:.1e}",
              flush=True)

    def best_of(configs: list[GemvConfig]) -> GemvConfig:
        best = (1e9, configs[0])
        for cfg in configs:
            if k % (cfg.block_k * cfg.split_k) == 0 and k // (cfg.block_k * cfg.split_k) <= 8:
                best = min(best, (time_cfg(cfg, reps=5), cfg), key=lambda p: p[0])
        return best[1]

    fp8 = kind == "fp8"
    print(f"{'':7s} {label:28s} {'read':7s} {nbytes / read_here / 1e3:8.2f} {read_here:7.0f} "
          f"{100 * read_here / bw[0]:6.1f} {100 * read_here / bw[1]:6.1f} {100.0:6.1f}  best plain "
          "read, same bytes")
    cfg = default_config(rows, n, k, bits, fp8=fp8, symmetric=kind == "int4sym")
    if pdl_supported(x.device):
        read_pdl = read_at(nbytes, pdl=True)
        print(f"{'':7s} {label:28s} {'read+pdl':8s}{nbytes / read_pdl / 1e3:8.2f} {read_pdl:7.0f} "
              f"{100 * read_pdl / bw[0]:6.1f} {100 * read_pdl / bw[1]:6.1f} "
              f"{100 * read_pdl / read_here:6.1f}  plain read, same bytes, chained with PDL")
        row("no-pdl", replace(cfg, pdl=False))
    row("default", cfg)
    if sweep:
        row("best", best_of(sweep_configs(kind)))


def bench_bf16(label: str, n: int, k: int, bw: tuple[float, float]) -> None:
    copies = max(2, (256 << 20) // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    t = gpu_time([partial(torch.nn.functional.linear, x, w) for w in ws])
    gbs = n * k * 2 / t / 1e9
    print(f"{'bf16':7s} {label:28s} {'F.lin':7s} {t * 1e6:8.2f} {gbs:7.0f} "
          f"{100 * gbs / bw[0]:6.1f} {100 * gbs / bw[1]:6.1f} "
          f"{100 * gbs / read_at(n * k * 2):6.1f}  torch F.linear baseline", flush=True)


def run_gpu(sweep: bool, kinds: list[str]) -> None:
    bw = bandwidths()
    print(f"device: {torch.cuda.get_device_name()}   torch {torch.__version__}   triton "
          f"{triton_version()}")
    print(f"copy (read+write) {bw[0]:.0f} GB/s, read-only (sum) {bw[1]:.0f} GB/s")
    tiny = torch.empty(1, device="cuda")
    floor = gpu_time([tiny.zero_ for _ in range(32)])
    print(f"launch floor: {floor * 1e6:.2f} us per kernel in a CUDA graph (a 1-element fill), "
          "the fixed cost every row below pays")
    print(f"{'format':7s} {'case':28s} {'kernel':7s} {'us':>8s} {'GB/s':>7s} "
          f"{'%copy':>6s} {'%read':>6s} {'%rd@sz':>6s}  notes (%rd@sz = of the best plain "
          "read of the same bytes)")
    for kind in (k for k in kinds if k != "bf16"):
        for case in CASES:
            if kind in ("fp8", "int4sym") and case[1] == 1 and case[2] != 4096:
                continue
            bench_case(kind, *case, bw, sweep and kind != "int4sym")
    if "bf16" in kinds:
        for label, _, n, k, _ in CASES[:4]:
            bench_bf16(label, n, k, bw)


def triton_version() -> str:
    return str(triton.__version__)


def time_cpu(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run_cpu() -> None:
    from spillover.kernels.triton.quant_gemv import default_config

    print("CPU dry run: Triton GEMV under TRITON_INTERPRET=1 on small shapes (correctness only)")
    for kind in ("int4", "int4sym", "int8", "fp8"):
        fmt = make(kind, 4, 64, 256, "cpu")
        fmt.act_dtype = torch.float32
        x = torch.randn(3, 256)
        ids = torch.tensor([0, 3, 1], dtype=torch.int32)
        bits = 4 if kind.startswith("int4") else 8
        for cfg in (default_config(3, 64, 256, bits, fp8=kind == "fp8"), GemvConfig(16, 128, 2, 4)):
            err = rel_err(call(fmt, x, ids, cfg)(), reference(fmt, x, ids))
            print(f"  {kind:7s} 3 rows x [4,64,256] {cfg}: max rel err {err:.1e}")
    print(f"CPU decode timings (torch {torch.__version__}, {torch.get_num_threads()} "
          "threads), batch 1:")
    for _, _, n, k, _ in (CASES[0], CASES[2], CASES[3]):
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k, dtype=torch.bfloat16)
        f8, f4 = Int8Weight.pack(w), Int4Weight.pack(w, 128)
        for name, fn, nbytes in (
            ("bf16 F.linear", partial(torch.nn.functional.linear, x, w.bfloat16()), n * k * 2),
            ("int8 per-channel", partial(f8.forward, x), n * k),
            ("int4 g128", partial(f4.forward, x), n * k // 2 + n * k // 64),
        ):
            t = time_cpu(fn)
            print(f"  {name:18s} {n}x{k}: {t * 1e6:9.1f} us  {nbytes / t / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (small shapes, no GPU)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="time only the default (heuristic) configs")
    ap.add_argument("--kinds", default="int4,int8,fp8,int4sym,bf16",
                    help="comma-separated formats to run")
    args = ap.parse_args()
    if args.cpu or not torch.cuda.is_available():
        run_cpu()
    else:
        run_gpu(sweep=not args.no_sweep, kinds=args.kinds.split(","))
