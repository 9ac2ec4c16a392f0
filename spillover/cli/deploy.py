"""`spillover deploy`: the planner's choice of engine, written out as compose.yaml, .env.example
and README.md (spillover/deploy)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from spillover.cli.args import add_quant_arg
from spillover.cli.plan import add_hardware_flags, hardware_from_args


def add_deploy_parser(sub: Any) -> None:
    p = sub.add_parser(
        "deploy",
        help="write compose.yaml, .env.example and README.md for a GPU box (spillover, vLLM or "
             "SGLang, as the planner decides)",
        description="Plan MODEL on the named hardware and write a deployment into --out: "
        "spillover when one GPU plus RAM serves it, vLLM (or SGLang) when it fits across the "
        "GPUs. Secrets are read from the environment at `docker compose up`, never written.",
    )
    p.add_argument("model", help="hub id, catalog name (e.g. qwen3-next-80b), model folder "
                                 "or .gguf file")
    p.add_argument("--out", required=True, type=Path, help="folder to write the files into")
    p.add_argument("--engine", default="auto", choices=("auto", "spillover", "vllm", "sglang"),
                   help="auto (default): a distributed engine when the model fits across the "
                        "GPUs, else spillover on one GPU + RAM")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the named kind per node "
                                                       "(default 1)")
    p.add_argument("--nodes", type=int, default=1,
                   help="machines (default 1); more writes a multi-node vLLM (Ray) or SGLang "
                        "deployment")
    add_quant_arg(p, help_text="weight format; auto = best quality that fits (default)")
    p.add_argument("--context", type=int, default=32768,
                   help="tokens per sequence the deployment must hold (default 32768)")
    p.add_argument("--seqs", type=int, default=1, help="concurrent sequences (default 1)")
    p.add_argument("--token-budget", type=int, default=2048,
                   help="tokens per forward pass (default 2048)")
    p.add_argument("--offline", action="store_true", help="never contact the hub")
    p.add_argument("--force", action="store_true", help="overwrite files already in --out")
    add_hardware_flags(p)
    p.set_defaults(func=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    from spillover.catalog import UnknownModelError
    from spillover.deploy import FILES, DeployError, choose, write_deployment
    from spillover.hw.gpus import UnknownGpuError
    from spillover.plan.memory import Limits
    from spillover.plan.source import ModelSourceError, resolve

    if min(args.context, args.seqs, args.token_budget, args.gpus, args.nodes) < 1:
        print("error: --context, --seqs, --token-budget, --gpus and --nodes must be positive",
              file=sys.stderr)
        return 2
    existing = [f for f in FILES if (args.out / f).exists()]
    if existing and not args.force:
        print(f"error: {args.out} already has {', '.join(existing)} (--force overwrites)",
              file=sys.stderr)
        return 2
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        hw = hardware_from_args(args)
        src = resolve(args.model, allow_hub=not args.offline)
        limits = Limits(context=args.context, seqs=args.seqs, token_budget=args.token_budget)
        d = choose(src, hw, limits, gpus=args.gpus, nodes=args.nodes, engine=args.engine,
                   quant=args.quant, model_arg=args.model)
    except (UnknownModelError, ModelSourceError, UnknownGpuError, DeployError, ValueError,
            OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_deployment(d, args.out)
    print(f"{d.engine}: {d.why[0]}")
    for w in d.why[1:]:
        print(f"  {w}")
    for path in paths:
        print(f"wrote {path}")
    return 0
