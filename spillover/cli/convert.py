"""`spillover convert SRC OUT --quant int4|int8|keep [--group-size N]` (wired into cli.py elsewhere)."""

from __future__ import annotations

import argparse

from spillover.weights.convert import QUANTS, convert


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint (safetensors or GGUF) into a quantized store",
        description="Streams SRC tensor by tensor into OUT; rerun to resume after a kill.",
    )
    p.add_argument("src", help="HF model folder, a .safetensors file, or a .gguf file")
    p.add_argument("out", help="output store folder (created; resumed if a previous run was interrupted)")
    p.add_argument("--quant", choices=QUANTS, default="int4",
                   help="format of float weight matrices; GGUF blocks and GPTQ / AWQ / compressed-tensors / "
                        "FP8 checkpoints import losslessly (default int4)")
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256), help="int4 group size")
    p.add_argument("--asymmetric", action="store_true", help="int4 with a float min per group")
    p.add_argument("--shard-size-gb", type=float, default=2.0, help="target shard size in GB")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.out, args.quant, args.group_size, symmetric=not args.asymmetric,
                  shard_bytes=int(args.shard_size_gb * 1e9), show_progress=not args.no_progress)
    print(f"store written: {out}")
    return 0
