"""GPU check of tiered experts: the Qwen3-Next-80B-A3B shape with fewer layers, synthetic int4
weights, bf16. The tiered model (GPU slots, pinned RAM and disk; misses copied, CPU-computed or
streamed) must give the resident model's logits within the bf16 noise the resident path itself
has (its Triton kernels against the torch references, SPILLOVER_KERNELS=ref).

    python scripts/gpu_tiered_check.py --layers 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from spillover.bench.synthetic import build_synthetic, load_synthetic_config, with_layers
from spillover.engine.params import SamplingParams
from spillover.llm import LLM
from spillover.offload.placement import ExpertPlacement
from spillover.offload.tiered import TieredExpertBank
from spillover.weights.build import move_model

MODEL = "Qwen/Qwen3-Next-80B-A3B-Instruct"
PLACEMENTS = {
    "copy-lru": ExpertPlacement(slots=256, host=192, policy="lru", miss_mode="copy"),
    "cpu-lfu": ExpertPlacement(slots=256, host=192, policy="lfu", miss_mode="cpu"),
    "auto-lrfu": ExpertPlacement(slots=256, host=192, policy="lrfu"),
    "stream": ExpertPlacement(slots=256, host=192, stream_rows=64),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = with_layers(load_synthetic_config(MODEL), args.layers)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=gen)
    prompts = [ids[:40].tolist(), ids[40:57].tolist(), ids[57:].tolist()]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    # Built on the CPU like the tiered ones (random draws differ between devices), then moved.
    built = build_synthetic(cfg, torch.device("cpu"), dt, "int4", seed=0)
    resident = LLM.from_model(move_model(built, dev), cfg, dev, dt, max_num_batched_tokens=32)
    ref = resident.forward_logits(ids.tolist())
    os.environ["SPILLOVER_KERNELS"] = "ref"
    noise = rel(resident.forward_logits(ids.tolist()), ref)
    del os.environ["SPILLOVER_KERNELS"]
    ref_tokens = [o.outputs[0].token_ids for o in resident.generate(prompts, greedy)]
    del resident
    torch.cuda.empty_cache()
    print(f"resident: Triton vs torch reference, relative L2 of logits = {noise:.2e}")

    failed = 0
    for name in args.placements.split(","):
        placement = PLACEMENTS[name]
        t0 = time.perf_counter()
        model = build_synthetic(cfg, torch.device("cpu"), dt, "int4", seed=0)
        llm = LLM.from_model(model, cfg, dev, dt, experts=placement, max_num_batched_tokens=32)
        err = rel(llm.forward_logits(ids.tolist()), ref)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        same = sum(a == b for t, r in zip(tokens, ref_tokens, strict=True)
                   for a, b in zip(t, r, strict=True))
        banks = [m for m in llm.model.modules() if isinstance(m, TieredExpertBank)]
        for b in banks:
            b.settle(wait=True)
        st = {k: sum(getattr(b.tier_stats, k) for b in banks)
              for k in ("copied_experts", "cpu_experts", "streamed_experts", "disk_experts")}
        hits = sum(b.residency.counters.hits for b in banks)
        looks = sum(b.residency.counters.lookups for b in banks)
        ok = err <= max(2 * noise, 1e-2)
        failed += not ok
        print(f"{name:10s} rel L2 vs resident {err:.2e} ({'ok' if ok else 'FAIL'}), greedy tokens "
              f"equal {same}/{sum(len(r) for r in ref_tokens)}, slot hits {hits}/{looks}, {st}, "
              f"{time.perf_counter() - t0:.0f} s")
        del llm, model, banks
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
