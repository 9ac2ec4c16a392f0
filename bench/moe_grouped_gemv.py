"""MoE GEMVs with a few rows per expert: per-row GEMV, grouped GEMV (rows per block), grouped GEMM.

    python bench/moe_grouped_gemv.py            # GPU: int4 (asymmetric, symmetric) at Qwen3-Next's w13/w2
    python bench/moe_grouped_gemv.py --blocks 2,4,8 --tokens 1,4,16,64,128,512

T tokens, each routed to 10 of 512 experts (random), so T x 10 rows. Variants: `gemv` (one program per
row and 16 channels: an expert's words are read once per row that picks it; the decode path),
`grouped xR` (`quant_gemv(..., rows_per_block=R)`: rows grouped by expert on the device, each program
reads and decodes its expert's words once for up to R rows), `gemm` (the grouped Triton GEMM, 16-row
blocks on tensor cores: the dispatcher's choice once an expert has more than 8 rows). Times are GPU
work only (calls replayed from a CUDA graph, 4 expert sets alternating); GB/s counts the distinct
experts' bytes a call must read. Max error is against the float32 reference, relative to the largest
output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spillover.kernels.ref_quant import quant_matmul_kn_ref  # noqa: E402
from spillover.kernels.triton.quant_gemm import quant_gemm  # noqa: E402
from spillover.kernels.triton.quant_gemv import quant_gemv  # noqa: E402
from spillover.quant import Int4Weight  # noqa: E402


def variants(bank: Int4Weight, x: torch.Tensor, blocks: list[int]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The calls compared, each taking the expert ids."""
    args = (bank.qweight, bank.scales, bank.mins)
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gemv": lambda ids: quant_gemv(x, *args, ids, bits=4, group_size=128)}
    for r in blocks:
        calls[f"grouped x{r}"] = partial(lambda ids, r: quant_gemv(x, *args, ids, bits=4, group_size=128,
                                                                   rows_per_block=r), r=r)
    calls["gemm"] = lambda ids: quant_gemm(x, *args, ids, bits=4, group_size=128)
    return calls


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quant_gemm as qg  # bench/quant_gemm.py: formats
    from quant_gemv import gpu_time  # bench/quant_gemv.py: CUDA-graph timing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="2,4,8", help="rows per block of the grouped GEMV")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--kinds", default="int4,int4sym")
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kind in args.kinds.split(","):
        for n, k, tag in ((1024, 2048, "w13"), (2048, 512, "w2")):
            w = torch.randn(qg.EXPERTS, n, k, device="cuda", generator=gen) * 0.02
            bank = Int4Weight.pack(w, 128, kind == "int4sym", act_dtype=torch.bfloat16).to_layout("kn")
            del w
            per_expert = qg.expert_bytes(bank)
            for tokens in (int(t) for t in args.tokens.split(",")):
                id_sets = [torch.stack([torch.randperm(qg.EXPERTS, device="cuda", generator=gen)[:qg.TOP_K]
                                        for _ in range(tokens)]).flatten().to(torch.int32) for _ in range(4)]
                x = torch.randn(tokens * qg.TOP_K, k, device="cuda", generator=gen).to(torch.bfloat16)
                touched = sum(int(torch.unique(ids).numel()) for ids in id_sets) / len(id_sets) * per_expert
                ref = quant_matmul_kn_ref(x.float(), bank.qweight, bank.scales, bank.mins, id_sets[0], bits=4,
                                          group_size=128)
                calls = variants(bank, x, blocks)
                row = []
                for name, call in calls.items():
                    err = float((call(id_sets[0]).float() - ref).abs().max() / ref.abs().max())
                    t = min(gpu_time([lambda ids=ids, call=call: call(ids) for ids in id_sets], reps=10)
                            for _ in range(2))
                    row.append(f"{name} {t * 1e6:7.1f} us {touched / t / 1e9:5.0f} GB/s (err {err:.0e})")
                print(f"{kind:7s} {tag} T={tokens:4d} rows={tokens * qg.TOP_K:5d}  " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
