"""W4A16 / W8A16 GEMV at batch 1: correctness vs the torch reference and achieved bandwidth.

    python bench/quant_gemv.py            # GPU: real shapes, CUDA-graph timing, block-size sweep
    python bench/quant_gemv.py --cpu      # dry run: Triton interpreter on small shapes + CPU op timings

Rows: `dense NxK` (one weight, x [1, K]) and `moe 10/E NxK` (x [10, K], each row to a different
expert of a stacked [E, N, K] bank: one decode token with top-10 routing). Bytes counted = codes +
scales (+ mins) actually read + activations. Every timed call runs on a different weight copy (or
expert set) so that L2 cannot serve it; calls are replayed from a CUDA graph so launch latency is
not measured. `copy` is a device-to-device memcpy (read + write bytes): the reference bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from spillover.kernels.ref_quant import quant_matmul_ref  # noqa: E402
from spillover.quant import Int4Weight, Int8Weight  # noqa: E402
from spillover.quant.grouped import GroupedIntWeight  # noqa: E402

GEMV_CONFIGS = [(bn, bk) for bn in (8, 16, 32, 64) for bk in (64, 128, 256)]


def make(bits: int, e: int, n: int, k: int, device: str, group: int = 128) -> GroupedIntWeight:
    w = torch.randn(e, n, k, device=device) * 0.02
    fmt: GroupedIntWeight
    if bits == 4:
        fmt = Int4Weight.pack(w, group, True, act_dtype=torch.bfloat16)
    else:
        fmt = Int8Weight.pack(w, act_dtype=torch.bfloat16)
    if e == 1:
        fmt.stacked = False
    return fmt


def weight_bytes(fmt: GroupedIntWeight, experts: int) -> int:
    per = sum(t.numel() * t.element_size() for t in (fmt.qweight[0], fmt.scales[0]))
    return per * experts


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


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = gpu_time([lambda: dst.copy_(src)], reps=10)
    return 2 * src.numel() / t / 1e9


def check(fmt: GroupedIntWeight, x: torch.Tensor, ids: torch.Tensor | None,
          kernel: Callable[..., torch.Tensor]) -> float:
    ref = quant_matmul_ref(x.float(), fmt.qweight, fmt.scales, fmt.mins, ids, bits=fmt.bits,
                           group_size=fmt.group_size)
    out = kernel(x, fmt.qweight, fmt.scales, fmt.mins, ids, bits=fmt.bits, group_size=fmt.group_size)
    return float((out.float() - ref).abs().max() / ref.abs().max())


def gemv_call(fmt: GroupedIntWeight, x: torch.Tensor, ids: torch.Tensor | None, bn: int,
              bk: int) -> Callable[[], object]:
    from spillover.kernels.triton.quant_gemv import quant_gemv

    return partial(quant_gemv, x, fmt.qweight, fmt.scales, fmt.mins, ids, bits=fmt.bits,
                   group_size=fmt.group_size, block_n=bn, block_k=bk)


CASES = [  # label, experts in the bank, N, K, rows
    ("dense 4096x4096", 1, 4096, 4096, 1),
    ("dense 1024x2048 (w13)", 1, 1024, 2048, 1),
    ("dense 2048x512 (w2)", 1, 2048, 512, 1),
    ("moe 10/128 1024x2048 (w13)", 128, 1024, 2048, 10),
    ("moe 10/128 2048x512 (w2)", 128, 2048, 512, 10),
]


def bench_int(bits: int, label: str, e: int, n: int, k: int, rows: int, hbm: float) -> None:
    from spillover.kernels.triton.quant_gemm import quant_gemm
    from spillover.kernels.triton.quant_gemv import quant_gemv

    if e == 1:  # distinct weight copies, >= 256 MB in all, so each call misses L2
        copies = max(2, (256 << 20) // (n * k * bits // 8))
        fmts = [make(bits, 1, n, k, "cuda") for _ in range(copies)]
        id_sets: list[torch.Tensor | None] = [None] * copies
    else:  # one bank, a different random expert set per call
        copies = 16
        fmts = [make(bits, e, n, k, "cuda")] * copies
        id_sets = [torch.randperm(e, device="cuda")[:rows].to(torch.int32) for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    err = max(check(fmts[0], x, id_sets[0], quant_gemv), check(fmts[0], x, id_sets[0], quant_gemm))
    nbytes = weight_bytes(fmts[0], rows) + x.numel() * 2 + rows * n * 2
    best = (1e9, 0, 0)
    for bn, bk in GEMV_CONFIGS:
        if fmts[0].group_size % bk or k % bk:
            continue
        t = gpu_time([gemv_call(f, x, ids, bn, bk) for f, ids in zip(fmts, id_sets, strict=True)])
        best = min(best, (t, bn, bk))
    t, bn, bk = best
    gbs = nbytes / t / 1e9
    print(f"int{bits} {label:33s} {t * 1e6:8.2f} {gbs:8.0f} {100 * gbs / hbm:6.1f}  "
          f"BLOCK_N={bn} BLOCK_K={bk}; GEMV+GEMM max rel err vs ref {err:.1e}")


def bench_bf16(label: str, n: int, k: int, hbm: float) -> None:
    copies = max(2, (256 << 20) // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    t = gpu_time([partial(torch.nn.functional.linear, x, w) for w in ws])
    gbs = n * k * 2 / t / 1e9
    print(f"bf16 {label:33s} {t * 1e6:8.2f} {gbs:8.0f} {100 * gbs / hbm:6.1f}  F.linear baseline")


def run_gpu() -> None:
    hbm = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}   torch {torch.__version__}")
    print(f"{'row':38s} {'us':>8s} {'GB/s':>8s} {'%copy':>6s}  notes")
    print(f"{'copy 1 GiB (read+write)':38s} {'':>8s} {hbm:8.0f} {100:6.0f}")
    for bits in (4, 8):
        for case in CASES:
            bench_int(bits, *case, hbm)
    for label, _, n, k, _ in CASES[:3]:
        bench_bf16(label, n, k, hbm)


def time_cpu(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run_cpu() -> None:
    from spillover.kernels.triton.quant_gemm import quant_gemm
    from spillover.kernels.triton.quant_gemv import quant_gemv

    print("CPU dry run: Triton kernels under TRITON_INTERPRET=1 on small shapes (correctness only)")
    for bits in (4, 8):
        fmt = make(bits, 4, 64, 256, "cpu")
        fmt.act_dtype = torch.float32
        x = torch.randn(3, 256)
        ids = torch.tensor([0, 3, 1], dtype=torch.int32)
        for kern in (quant_gemv, quant_gemm):
            err = check(fmt, x, ids, kern)
            print(f"  int{bits} {kern.__name__:10s} 3 rows x [4,64,256]  max rel err {err:.1e}")
    print(f"CPU decode timings (torch {torch.__version__}, {torch.get_num_threads()} threads), batch 1:")
    for _, _, n, k, _ in CASES[:3]:
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (small shapes, no GPU)")
    args = ap.parse_args()
    if args.cpu or not torch.cuda.is_available():
        run_cpu()
    else:
        run_gpu()
