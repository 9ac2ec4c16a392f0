"""The dispatcher's int4 MoE path at prefill-chunk sizes against the grouped GEMM.

    python bench/moe_dispatch_rows.py      # GPU: int4 asymmetric and symmetric, Qwen3-Next w13/w2, T = 16-256

T tokens x top-10 of 512 experts (random routing). `dispatch`: `Int4Weight.forward_experts` on the bank as
`.to("cuda")` lays it out (tiled words on Hopper), what a model layer calls (the kernel it chose is printed;
up to `INT4_SYNC_FREE_ROWS` rows it takes the GEMV without counting rows on the host); `gemm kn` / `gemm
tiled`: the grouped Triton GEMM called directly on kn words and on the bank's own layout. GPU time from CUDA-graph
replay over 4 expert sets (rows above the sync-free bound are counted on the host, which a graph cannot
capture: only the GEMM is timed there). Max error against the float32 reference, relative to the largest
output.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spillover.kernels.ref_quant import quant_matmul_kn_ref  # noqa: E402
from spillover.kernels.triton.quant_gemm import quant_gemm  # noqa: E402
from spillover.quant import Int4Weight  # noqa: E402
from spillover.quant.dispatch import INT4_SYNC_FREE_ROWS, busiest_expert_rows, choose_kernel  # noqa: E402


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quant_gemv import gpu_time  # bench/quant_gemv.py: CUDA-graph timing

    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for sym in (False, True):
        for n, k, tag in ((1024, 2048, "w13"), (2048, 512, "w2")):
            w = torch.randn(512, n, k, device="cuda", generator=gen) * 0.02
            packed = Int4Weight.pack(w, 128, sym, act_dtype=torch.bfloat16)
            del w
            bank = packed.to("cuda")  # the layout a model holds: tiled where the tensor-core GEMV reads it
            kn = packed.to_layout("kn")
            del packed
            args = (kn.qweight, kn.scales, kn.mins)
            own = (bank.qweight, bank.scales, bank.mins)
            tiled = bank.layout == "tiled"
            for tokens in (16, 64, 128, 256):
                id_sets = [torch.stack([torch.randperm(512, device="cuda", generator=gen)[:10]
                                        for _ in range(tokens)]).flatten() for _ in range(4)]
                x = torch.randn(tokens * 10, k, device="cuda", generator=gen).to(torch.bfloat16)
                kernel = choose_kernel(bank, x.device, busiest_expert_rows(x, id_sets[0], INT4_SYNC_FREE_ROWS),
                                       moe=True)[0]
                ref = quant_matmul_kn_ref(x.float(), *args, id_sets[0], bits=4, group_size=128)
                err = float((bank.forward_experts(x, id_sets[0]).float() - ref).abs().max() / ref.abs().max())
                dispatch = "not timed (host count)"
                if x.shape[0] <= INT4_SYNC_FREE_ROWS:
                    t = min(gpu_time([partial(bank.forward_experts, x, ids) for ids in id_sets], reps=5)
                            for _ in range(2))
                    dispatch = f"{t * 1e6:6.0f} us"
                t_gemm = min(gpu_time([partial(quant_gemm, x, *args, ids, bits=4, group_size=128)
                                       for ids in id_sets], reps=5) for _ in range(2))
                t_own = min(gpu_time([partial(quant_gemm, x, *own, ids, bits=4, group_size=128, tiled=tiled)
                                      for ids in id_sets], reps=5) for _ in range(2))
                print(f"{'int4sym' if sym else 'int4':7s} {tag} T={tokens:3d}: dispatch ({bank.layout}) -> "
                      f"{kernel:22s} {dispatch} (err {err:.0e}) | gemm kn {t_gemm * 1e6:6.0f} us | "
                      f"gemm {bank.layout} {t_own * 1e6:6.0f} us", flush=True)


if __name__ == "__main__":
    main()
