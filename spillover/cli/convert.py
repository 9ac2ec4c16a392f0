"""`spillover convert SRC OUT --quant int4|int8|auto [--group-size N]`, wired into cli/main.py."""

from __future__ import annotations

import argparse

from spillover.cli.args import add_hub_args, add_quant_arg


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint (safetensors or GGUF) into a quantized store",
        description="Streams SRC tensor by tensor into OUT; rerun to resume after a kill.",
    )
    p.add_argument("src", help="HF model folder, a .safetensors file, a .gguf file, or a hub id "
                               "(Org/Name: downloaded into the Hugging Face cache first)")
    p.add_argument("out",
                   help="output store folder (created; resumed if a previous run was interrupted)")
    add_quant_arg(p, default="int4",
                  help_text="format of float weight matrices: int4 (default), int8, or "
                            "auto to keep every tensor as stored; GGUF blocks and GPTQ / "
                            "AWQ / compressed-tensors / FP8 checkpoints import losslessly "
                            "(bf16, fp8, int4-experts and native apply at load: generate / "
                            "chat / serve --quant)")
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256),
                   help="int4 group size (default 128)")
    p.add_argument("--asymmetric", action="store_true", help="int4 with a float min per group")
    p.add_argument("--shard-size-gb", type=float, default=2.0, help="target shard size in GB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_hub_args(p)
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    from spillover.plan.hub import is_hub_id
    from spillover.weights.convert import convert
    from spillover.weights.hub import HubOptions, fetch_hub_model

    src = args.src
    if is_hub_id(src):
        # no fit check: convert streams a checkpoint of any size through bounded RAM
        _, src = fetch_hub_model(src, HubOptions(revision=args.revision,
                                                 gguf_file=args.gguf_file))
    elif args.revision or args.gguf_file:
        raise ValueError("--revision and --gguf-file apply to hub ids (Org/Name) only")
    out = convert(src, args.out, args.quant, args.group_size, symmetric=not args.asymmetric,
                  shard_bytes=int(args.shard_size_gb * 1e9), show_progress=not args.no_progress)
    print(f"store written: {out}")
    return 0
