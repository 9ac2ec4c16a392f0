"""The dispatcher's MoE path at prefill-chunk sizes against the grouped GEMM; the crossover.

    python bench/moe_dispatch_rows.py                   # GPU: int4 asym and sym, T = 16-256
    python bench/moe_dispatch_rows.py --kinds int8,fp8  # GPU: GEMV against GEMM, T = 4-128

T tokens x top-10 of 512 experts (random routing), Qwen3-Next's w13 (1024x2048) and w2 (2048x512).
- int4: `dispatch`: `Int4Weight.forward_experts` on the bank as `.to("cuda")` lays it out (tiled
  words on Hopper), what a model layer calls (the kernel it chose is printed; up to `SYNC_FREE_ROWS`
  rows it takes the GEMV without counting rows on the host); `gemm kn` / `gemm tiled`: the grouped
  Triton GEMM called directly on kn words and on the bank's own layout.
- int8 (per channel), fp8 (block 128): `gemv` (the decode GEMV kernel called on every row) against
  `gemm` (the grouped GEMM), and the kernel the dispatcher picks: what `SYNC_FREE_ROWS` for those
  formats rests on.
GPU time from CUDA-graph replay over 4 expert sets (rows above a sync-free bound are counted on the
host, which a graph cannot capture: those dispatch rows are not timed). Max error against the
float32 reference, relative to the largest output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spillover.kernels.quant_dispatch import (  # noqa: E402
    SYNC_FREE_ROWS,
    busiest_expert_rows,
    choose_fp8_kernel,
    choose_kernel,
)
from spillover.kernels.ref_quant import fp8_matmul_ref, quant_matmul_kn_ref  # noqa: E402
from spillover.kernels.triton.fp8_gemv import fp8_gemv  # noqa: E402
from spillover.kernels.triton.quant_gemm import fp8_gemm, quant_gemm  # noqa: E402
from spillover.kernels.triton.quant_gemv import quant_gemv  # noqa: E402
from spillover.quant import Fp8BlockWeight, Int4Weight, Int8Weight  # noqa: E402
from spillover.quant.grouped import GroupedIntWeight  # noqa: E402

SHAPES = ((1024, 2048, "w13"), (2048, 512, "w2"))
Call = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, expert ids) -> y


def _time(gpu_time, fn: Call, x: torch.Tensor, id_sets: list[torch.Tensor]) -> float:  # type: ignore[no-untyped-def]
    return min(gpu_time([partial(fn, x, ids) for ids in id_sets], reps=5) for _ in range(2))


def _err(fn: Call, ref: Call, x: torch.Tensor, ids: torch.Tensor) -> float:
    want = ref(x, ids)
    return float((fn(x, ids).float() - want).abs().max() / want.abs().max())


def int4_rows(gpu_time, gen: torch.Generator, tokens: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    for sym in (False, True):
        for n, k, tag in SHAPES:
            int4_shape(gpu_time, gen, tokens, sym, n, k, tag)


def int4_shape(gpu_time, gen: torch.Generator, tokens: tuple[int, ...], sym: bool, n: int, k: int,  # type: ignore[no-untyped-def]
               tag: str) -> None:
    w = torch.randn(512, n, k, device="cuda", generator=gen) * 0.02
    packed = Int4Weight.pack(w, 128, sym, act_dtype=torch.bfloat16)
    del w
    bank = packed.to("cuda")  # the layout a model holds: tiled where the tensor-core GEMV reads it
    kn = packed.to_layout("kn")
    del packed
    tiled = bank.layout == "tiled"

    def gemm_kn(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return quant_gemm(x, kn.qweight, kn.scales, kn.mins, ids, bits=4, group_size=128)

    def gemm_own(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return quant_gemm(x, bank.qweight, bank.scales, bank.mins, ids, bits=4, group_size=128,
                          tiled=tiled)

    def ref(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return quant_matmul_kn_ref(x.float(), kn.qweight, kn.scales, kn.mins, ids, bits=4,
                                   group_size=128)

    for t in tokens:
        id_sets, x = _inputs(gen, t, k)
        kernel = choose_kernel(bank, x.device, busiest_expert_rows(x, id_sets[0]), moe=True)[0]
        err = _err(bank.forward_experts, ref, x, id_sets[0])
        dispatch = "not timed (host count)"
        if x.shape[0] <= SYNC_FREE_ROWS:
            dispatch = f"{_time(gpu_time, bank.forward_experts, x, id_sets) * 1e6:6.0f} us"
        t_kn, t_own = _time(gpu_time, gemm_kn, x, id_sets), _time(gpu_time, gemm_own, x, id_sets)
        print(f"{'int4sym' if sym else 'int4':7s} {tag} T={t:3d}: dispatch ({bank.layout}) -> "
              f"{kernel:22s} {dispatch} (err {err:.0e}) | gemm kn {t_kn * 1e6:6.0f} us | gemm "
              f"{bank.layout} {t_own * 1e6:6.0f} us",
              flush=True)


def other_rows(kind: str, gpu_time, gen: torch.Generator, tokens: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    """int8 / fp8: the GEMV on every row against the grouped GEMM (both called directly)."""
    for n, k, tag in SHAPES:
        w = torch.randn(512, n, k, device="cuda", generator=gen) * 0.02
        if kind == "fp8":
            calls = _fp8_calls(Fp8BlockWeight.pack(w, act_dtype=torch.bfloat16))
        else:
            calls = _int8_calls(Int8Weight.pack(w, None, act_dtype=torch.bfloat16).to_layout("kn"))
        del w
        gemv, gemm, ref, pick = calls
        for t in tokens:
            id_sets, x = _inputs(gen, t, k)
            e_gemv, e_gemm = _err(gemv, ref, x, id_sets[0]), _err(gemm, ref, x, id_sets[0])
            t_gemv, t_gemm = _time(gpu_time, gemv, x, id_sets), _time(gpu_time, gemm, x, id_sets)
            print(f"{kind:7s} {tag} T={t:3d} ({t * 10:4d} rows): gemv {t_gemv * 1e6:6.0f} "
                  f"us (err {e_gemv:.0e}) | gemm {t_gemm * 1e6:6.0f} us (err {e_gemm:.0e}) "
                  f"| dispatch picks {pick(x, id_sets[0])} (sync-free up to "
                  f"{SYNC_FREE_ROWS} rows)", flush=True)


# gemv, gemm, reference, dispatch pick
Calls = tuple[Call, Call, Call, Callable[[torch.Tensor, torch.Tensor], str]]


def _fp8_calls(f8: Fp8BlockWeight) -> Calls:
    wt, sc = f8.stacked_views()

    def gemv(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fp8_gemv(x, wt, sc, ids, block=f8.block_shape)

    def gemm(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fp8_gemm(x, wt, sc, ids, block=f8.block_shape)

    def ref(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fp8_matmul_ref(x.float(), wt, sc, ids, block=f8.block_shape)

    def pick(x: torch.Tensor, ids: torch.Tensor) -> str:
        return choose_fp8_kernel(f8, x.device, busiest_expert_rows(x, ids), moe=True)[0]

    return gemv, gemm, ref, pick


def _int8_calls(i8: GroupedIntWeight) -> Calls:
    parts = (i8.qweight, i8.scales, i8.mins)

    def gemv(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return quant_gemv(x, *parts, ids, bits=8, group_size=i8.group_size)

    def gemm(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return quant_gemm(x, *parts, ids, bits=8, group_size=i8.group_size)

    def ref(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return quant_matmul_kn_ref(x.float(), *parts, ids, bits=8, group_size=i8.group_size)

    def pick(x: torch.Tensor, ids: torch.Tensor) -> str:
        return choose_kernel(i8, x.device, busiest_expert_rows(x, ids), moe=True)[0]

    return gemv, gemm, ref, pick


def _inputs(gen: torch.Generator, tokens: int, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    id_sets = [torch.stack([torch.randperm(512, device="cuda", generator=gen)[:10]
                            for _ in range(tokens)]).flatten() for _ in range(4)]
    return id_sets, torch.randn(tokens * 10, k, device="cuda", generator=gen).to(torch.bfloat16)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quant_gemv import gpu_time  # bench/quant_gemv.py: CUDA-graph timing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="int4",
                    help="int4 (asymmetric and symmetric), int8, fp8; comma-separated")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kind in args.kinds.split(","):
        if kind == "int4":
            int4_rows(gpu_time, gen, (16, 64, 128, 256))
        else:
            other_rows(kind, gpu_time, gen, (4, 8, 16, 32, 64, 128))


if __name__ == "__main__":
    main()
