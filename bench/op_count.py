"""GPU operations per decode step of the Qwen3-Next-80B-A3B layer pattern, counted on the CPU
(`spillover.bench.op_count`): the number a CUDA graph replays, per layer kind and per op.

    python bench/op_count.py --layers 4 --batch 1
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spillover import LLM, SamplingParams  # noqa: E402
from spillover.bench.op_count import count_ops  # noqa: E402
from spillover.bench.synthetic import build_synthetic, load_synthetic_config, with_layers  # noqa: E402
from spillover.engine.engine import EngineConfig  # noqa: E402
from spillover.offload.placement import ExpertPlacement  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen3-Next-80B-A3B-Instruct")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--detail", action="store_true", help="ops of each layer by name")
    ap.add_argument("--mapped", action="store_true",
                    help="tiered experts, half in slots, misses mapped (offload/mapped.py)")
    args = ap.parse_args()
    full = with_layers(load_synthetic_config(args.model), args.layers)
    # the same layer pattern and head counts at a size the CPU builds in seconds
    cfg = replace(full, hidden_size=256, num_experts=32, moe_intermediate_size=128,
                  shared_expert_intermediate_size=128 if full.shared_expert_intermediate_size
                  else 0, vocab_size=512, intermediate_size=256)
    model = build_synthetic(cfg, "cpu", torch.bfloat16, args.quant, seed=0)
    experts = (ExpertPlacement(slots=cfg.num_experts // 2, host=cfg.num_experts,
                               miss_mode="mapped") if args.mapped else None)
    llm = LLM.from_model(model, cfg, torch.device("cpu"), torch.bfloat16, experts=experts)
    engine = llm.make_engine(EngineConfig(max_num_seqs=max(args.batch, 1), emulate_graphs=True,
                                          enable_prefix_caching=False))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", list(range(1 + i, 20 + i)), params)
    for _ in range(3):  # prefill and the first decode steps
        engine.step()
    graphs = engine.runner.graphs
    assert graphs is not None
    b = graphs.bucket(args.batch)
    assert b is not None
    layers = list(graphs.model.model.layers)
    with count_ops() as c:
        ctx = graphs._context(b)
        prelude = c.total
        before: list[Counter[str]] = []
        detail: list[Counter[str]] = []
        hooks = [layer.register_forward_pre_hook(lambda m, a: before.append(Counter(c.ops)))
                 for layer in layers]
        hooks += [layer.register_forward_hook(lambda m, a, o: detail.append(
            Counter(c.ops) - before[len(detail)])) for layer in layers]
        carry: tuple[torch.Tensor, ...] = (graphs.packed[:b, 0],)
        for piece in graphs.pieces:
            carry = piece.run(carry, ctx)
        for h in hooks:
            h.remove()
    kinds = ["attention" if layer.is_attention else "linear" for layer in layers]
    print(f"decode step, batch {args.batch} (bucket {b}), {len(layers)} layers: "
          f"{c.total} ops; context prelude {prelude}")
    for i, (kind, ops) in enumerate(zip(kinds, detail, strict=True)):
        print(f"  layer {i} ({kind}): {ops.total()}")
        if args.detail:
            print("    " + ", ".join(f"{k} {n}" for k, n in ops.most_common()))
    for name, n in c.ops.most_common():
        print(f"  {n:5d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
