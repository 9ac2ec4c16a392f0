"""int4 GEMV on tensor cores (`kernels/triton/int4_mma_gemv.py`) against the CUDA-core GEMV, A/B.

    python bench/int4_mma_gemv.py          # GPU (sm_80+): correctness vs torch, A/B timings
    python bench/int4_mma_gemv.py --l2     # also with the weights resident in L2

Rows: dense 4096x4096 and Qwen3-Next's MoE shapes (w13 1024x2048, w2 2048x512, 10 of 512 experts),
for asymmetric (`int4`) and symmetric (`int4sym`) g128 weights. Variants: `cuda-core` (the CUDA-core
GEMV, `quant_gemv.py`, called directly), and the tensor-core kernel with x handed over by shuffles
(`mma x:shfl`) or read from L1 (`mma x:L1`), the latter also under a 48-register cap
(`mma x:L1 r48`), on kn words, and on the same words tiled (`ref_quant.tile_words`, what
`.to("cuda")` holds for int4 experts on Hopper: `tiled x:shfl r48` is the dispatcher's path there;
dense rows show what tiling would give). Each is timed --reps times, alternating, in the harness of
bench/quant_gemv.py (a different weight copy or expert set per call, calls replayed from a CUDA
graph); the median is printed. --l2 also times every variant with all calls on the first weight copy
or expert set, which then stays in L2: how long the kernel takes when HBM is not the limit (its
compute and fixed costs). `spillover.kernels.quant_dispatch` uses the tensor-core kernel where these
rows showed it faster on Hopper: int4 experts, with `default_mma_config` (docs/kernel_notes.md,
"int4 GEMV on tensor cores, sixth session", "int4 GEMV: runs of word rows, register caps, ...").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from spillover.kernels.triton.int4_mma_gemv import MmaConfig, default_mma_config, int4_mma_gemv  # noqa: E402


def ab_case(bench, kind: str, case: tuple, bw: float, reps: int, pdl: bool, l2: bool) -> None:  # type: ignore[no-untyped-def]
    """Shipped kernel against this one (x by shuffles, x from L1), alternating, median of `reps`."""
    label, e, n, k, rows = case
    fmts, id_sets, x = bench.setup(kind, e, n, k, rows)
    nbytes = bench.weight_bytes(fmts[0], rows) + x.numel() * 2 + rows * n * 2
    ref = bench.reference(fmts[0], x, id_sets[0])

    def mma(f, ids, cfg, tiled=False):  # type: ignore[no-untyped-def]
        return lambda: int4_mma_gemv(x, f.qweight, f.scales, f.mins, ids, bits=4, group_size=128,
                                     tiled=tiled, config=cfg, pdl=pdl)

    tiled = {id(f): f.to_layout("tiled") for f in fmts}  # MoE: one bank, 32 expert sets

    def mma_t(f, ids, cfg):  # type: ignore[no-untyped-def]
        return mma(tiled[id(f)], ids, cfg, tiled=True)

    dflt = default_mma_config(kind == "int4sym", k)
    variants = {"cuda-core": lambda f, ids: bench.call(f, x, ids, None),
                "mma x:shfl": lambda f, ids: mma(f, ids, MmaConfig(x_l1=False)),
                "mma x:L1": lambda f, ids: mma(f, ids, MmaConfig(x_l1=True)),
                "mma x:L1 r48": lambda f, ids: mma(f, ids, MmaConfig(x_l1=True, max_regs=48)),
                "tiled x:shfl": lambda f, ids: mma_t(f, ids, MmaConfig(x_l1=False)),
                "tiled x:shfl r48":
                    lambda f, ids: mma_t(f, ids, MmaConfig(x_l1=False, max_regs=48)),
                "tiled x:L1 r48": lambda f, ids: mma_t(f, ids, MmaConfig(x_l1=True, max_regs=48))}
    errs = {v: bench.rel_err(mk(fmts[0], id_sets[0])(), ref) for v, mk in variants.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    resident: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(reps):
        for v, mk in variants.items():
            times[v].append(bench.gpu_time([
                mk(f, ids) for f, ids in zip(fmts, id_sets, strict=True)]))
            if l2:  # as many calls, all on one weight copy / expert set: it stays in L2
                resident[v].append(bench.gpu_time([mk(fmts[0], id_sets[0]) for _ in fmts]))
    print(f"{kind} {label} (mma default: kn {dflt}, tiled "
          f"{default_mma_config(kind == 'int4sym', k, True)})")
    for v, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        in_l2 = f"  L2-resident {sorted(resident[v])[reps // 2] * 1e6:6.2f} us" if l2 else ""
        print(f"  {v:16s} {med * 1e6:6.2f} us {100 * nbytes / med / 1e9 / bw:5.1f}% of read  "
              f"(all {' '.join(f'{u * 1e6:.2f}' for u in ts)})  max err {errs[v]:.1e}{in_l2}")


def main() -> None:
    import quant_gemv as bench  # bench/quant_gemv.py: shapes, weight copies, CUDA-graph timing

    from spillover.kernels.triton.quant_gemv import pdl_supported

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4,
                    help="alternating repetitions; the median is printed")
    ap.add_argument("--l2", action="store_true", help="also time with the weights resident in L2")
    args = ap.parse_args()
    pdl = pdl_supported(torch.device("cuda"))
    bw = bench.bandwidths()
    print(f"{torch.cuda.get_device_name()} triton {triton.__version__} read {bw[1]:.0f} "
          f"GB/s pdl={int(pdl)}")
    want = ("dense 4096x4096", "moe 10/512 1024x2048 (w13)", "moe 10/512 2048x512 (w2)")
    if args.l2:  # 4x the work of 4096x4096: how the time grows once fixed costs are amortised
        want += ("dense 8192x8192",)
    for kind in ("int4", "int4sym"):
        for case in [c for c in bench.CASES if c[0] in want]:
            ab_case(bench, kind, case, bw[1], args.reps, pdl, args.l2)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
