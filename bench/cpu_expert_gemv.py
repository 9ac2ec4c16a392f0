"""CPU int4 expert GEMV (a decode miss computed on the CPU) against the machine's DRAM read
bandwidth: Qwen3-Next expert shapes, w13 [1024, 2048] and w2 [2048, 512], group 128, through the
dispatch point (`spillover.kernels.quant_matmul`, the CPU weight-only int4 op), one token.

    python bench/cpu_expert_gemv.py [--experts 256] [--threads 16]

Experts rotate over a set larger than the caches, so every call reads its weights from DRAM.
"""

from __future__ import annotations

import argparse
import time

import torch

from spillover.quant.int4 import Int4Weight


def dram_read_gbs(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """A large sum streams the buffer once: bytes read per second (the best of `reps`)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, DRAM read {dram_read_gbs():.1f} GB/s")
    for name, n, k in (("w13", 1024, 2048), ("w2", 2048, 512)):
        w = torch.randn(args.experts, n, k) * 0.02
        fmt = Int4Weight.pack(w, group_size=128, symmetric=False, scale_dtype=torch.bfloat16,
                              act_dtype=torch.bfloat16)  # what --quant int4 loads
        x = torch.randn(1, k, dtype=torch.bfloat16)
        for e in range(args.experts):  # the op's packing is built once per expert, then cached
            fmt.expert_forward(x, e)
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for e in range(args.experts):
                fmt.expert_forward(x, e)
            best = min(best, time.perf_counter() - t0)
        per_call = best / args.experts
        packed = fmt.nbytes / args.experts
        print(f"{name} [{n}x{k}] int4 g128: {per_call * 1e6:.0f} us a call, "
              f"{packed / per_call / 1e9:.1f} GB/s of packed weights")


if __name__ == "__main__":
    main()
