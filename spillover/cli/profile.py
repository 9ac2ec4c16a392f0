"""`spillover profile MODEL --text FILE --out stats.json`: route a text through the model and save
each MoE layer's expert counts, for `--expert-stats FILE` (hot experts placed and pinned first)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_profile_parser(sub: Any, add_model_args: Any) -> None:
    p = sub.add_parser("profile", help="save routing statistics of a text for --expert-stats")
    add_model_args(p)
    p.add_argument("--text", required=True, help="a UTF-8 text file routed through the model")
    p.add_argument("--out", required=True, help="where the JSON statistics go")
    p.add_argument("--chunk", type=int, default=512, help="tokens per forward pass")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens of the text to route")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from spillover.bench.prefetch import measure_prefetch
    from spillover.cli.args import llm_kwargs
    from spillover.llm import LLM
    from spillover.offload.profile import record_routing, routed_banks
    from spillover.offload.residency import ExpertStats

    llm = LLM(**llm_kwargs(args))
    banks = routed_banks(llm.model)
    if not banks:
        raise ValueError(f"{llm.source.path}: the model has no routed experts to profile")
    ids = llm.tokenizer(Path(args.text).read_text(encoding="utf-8")).input_ids[: args.max_tokens]
    if not ids:
        raise ValueError(f"{args.text}: no tokens")
    stats = ExpertStats(len(banks), llm.config.num_experts, model=str(llm.source.path))
    with record_routing(llm.model, stats), measure_prefetch(llm.model) as acc:
        for start in range(0, len(ids), args.chunk):
            llm.forward_logits(ids[start : start + args.chunk])
    stats.save(args.out)
    print(f"routing of {len(ids)} tokens over {len(banks)} MoE layers saved to {args.out}")
    print(f"next-layer router on this layer's input predicts {acc.overall:.1%} of the next "
          "layer's experts (the prefetch predictor)")
    return 0
