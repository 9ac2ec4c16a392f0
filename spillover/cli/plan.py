"""`spillover plan` and `spillover probe`: argparse sub-commands wired into spillover/cli/main.py.

add_plan_parsers(subparsers)   # each parser sets `func` to its handler: handler(args) -> exit code
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from spillover.cli.args import add_quant_arg


def add_hardware_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "hardware (default: this machine; naming any of --gpu/--vram/--ram/--no-gpu plans "
        "for that machine and ignores this one's cached measurements)"
    )
    g.add_argument("--gpu",
                   help="a known GPU: rtx5090, 4090, h100, 'RTX PRO 6000' ... (see `probe --gpus`)")
    g.add_argument("--no-gpu", action="store_true", help="plan for CPU only")
    g.add_argument("--vram", help="GPU memory, e.g. 32GiB (overrides the table)")
    g.add_argument("--ram", help="system RAM, e.g. 60GB")
    g.add_argument("--disk", help="free disk for model files, e.g. 1.9TB")
    g.add_argument("--pcie", type=int, choices=(3, 4, 5, 6), help="PCIe generation of the GPU link")
    g.add_argument("--ram-bw", help="RAM read bandwidth with all threads, e.g. 80GB/s")
    g.add_argument("--gpu-bw", help="achieved GPU memory bandwidth, e.g. 1500GB/s")
    g.add_argument("--disk-bw", help="disk read rate through mmap, e.g. 3GB/s")


def add_plan_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="memory bill, placement and predicted speed, before any download",
        description="Exact memory bill, GPU/RAM/disk placement and predicted tok/s for a "
        "model id, local folder or GGUF file (headers only, no weights).",
    )
    p.add_argument(
        "model", nargs="?", help="hub id, catalog name (e.g. qwen3-8b), model folder or .gguf file"
    )
    add_quant_arg(p, help_text="weight format; auto = best quality that fits (default)")
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence (default 32768)")
    p.add_argument("--seqs", type=int, default=1, help="concurrent sequences (default 1)")
    p.add_argument("--token-budget", type=int, default=2048,
                   help="tokens per forward pass (default 2048)")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs of the named kind (default 1); more also plans the split vLLM "
                        "would serve them with")
    p.add_argument("--offline", action="store_true", help="never contact the hub")
    p.add_argument("--revision", default=None,
                   help="hub id only: a branch, tag or commit of the repo (default: main)")
    p.add_argument("--gguf-file", default=None, metavar="FILE",
                   help="hub id of a GGUF repo: plan this file (default: the largest that fits)")
    p.add_argument("--list-models", action="store_true", help="list the built-in catalog and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_hardware_flags(p)
    p.set_defaults(func=run_plan)

    q = subparsers.add_parser("probe", help="GPUs, CPU, RAM, disk and link speeds of this machine")
    q.add_argument("--measure", action="store_true",
                   help="run short link micro-benchmarks (and, without a GPU, the CPU decode "
                        "step's fixed costs through the engine) and cache them")
    q.add_argument("--disk-path",
                   help="where to measure free disk / read speed (default: the HF cache)")
    q.add_argument("--gpus", action="store_true", help="list the built-in GPU table and exit")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=run_probe)


def _machine_named(args: argparse.Namespace) -> bool:
    return bool(args.gpu or args.vram or args.ram or args.no_gpu)


def hardware_from_args(args: argparse.Namespace) -> Any:
    from spillover.hw.info import with_overrides
    from spillover.hw.probe import probe

    base = probe(use_cache=not _machine_named(args))
    return with_overrides(
        base,
        gpu=args.gpu,
        no_gpu=args.no_gpu,
        vram=args.vram,
        ram=args.ram,
        disk=args.disk,
        pcie=args.pcie,
        ram_bw=args.ram_bw,
        gpu_bw=args.gpu_bw,
        disk_bw=args.disk_bw,
    )


def _error(msg: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": msg}))
    else:
        print(f"error: {msg}", file=sys.stderr)
    return 2


def run_plan(args: argparse.Namespace) -> int:
    from spillover.catalog import CONFIGS, UnknownModelError
    from spillover.hw.gpus import UnknownGpuError
    from spillover.plan.advice import make_plan
    from spillover.plan.memory import Limits
    from spillover.plan.report import render, to_json
    from spillover.plan.source import ModelSourceError, resolve

    if args.list_models:
        for key in CONFIGS:
            print(key)
        return 0
    if not args.model:
        return _error(
            "give a MODEL (hub id, catalog name, folder or .gguf); --list-models shows the catalog",
            args.json
        )
    if min(args.context, args.seqs, args.token_budget, args.gpus) < 1:
        return _error("--context, --seqs, --token-budget and --gpus must be positive", args.json)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        hw = hardware_from_args(args)
        limits = Limits(context=args.context, seqs=args.seqs, token_budget=args.token_budget)

        def fits(s: Any) -> bool:  # a GGUF repo: the largest quantization that fits
            return bool(make_plan(s.name, s.config, s.inventory, hw, limits, args.quant,
                                  advise=False, fixed=s.scheme).fits)

        src = resolve(args.model, allow_hub=not args.offline, revision=args.revision,
                      gguf_file=args.gguf_file, fits=fits,
                      max_bytes=hw.ram_total + (hw.gpu.vram_total if hw.gpu else 0))
    except (UnknownModelError, ModelSourceError, UnknownGpuError, ValueError, OSError) as e:
        return _error(str(e), args.json)
    plan = make_plan(src.name, src.config, src.inventory, hw, limits, args.quant, fixed=src.scheme)
    plan = replace(plan, checkpoint_bytes=src.checkpoint_bytes, reasons=plan.reasons + src.notes)
    # several GPUs, or one that is not enough: what a split over GPUs would do (spillover/deploy)
    from spillover.deploy import gpu_advice

    more = gpu_advice(src, hw, limits, args.quant, args.gpus, plan.fits)
    plan = replace(plan, suggestions=plan.suggestions + tuple(more))
    if args.json:
        print(json.dumps(to_json(plan), indent=1))
    else:
        render(plan)
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from rich.console import Console

    from spillover.hw.gpus import GPUS
    from spillover.hw.probe import probe
    from spillover.plan.report import hardware_table

    if args.gpus:
        rows = [
            {
                "key": g.key,
                "name": g.name,
                "vram_gb": g.vram_gb,
                "mem_bw_gbs": g.mem_bw_gbs,
                "bf16_tflops": g.bf16_tflops,
                "sm": g.sm,
                "pcie": f"gen{g.pcie_gen} x{g.pcie_width}",
            }
            for g in GPUS
        ]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(
                    f"{r['key']:<16} {r['name']:<52} {r['vram_gb']:>5} GB "
                    f"{r['mem_bw_gbs']:>6} GB/s {r['sm']}"
                )
        return 0
    hw = probe(measure=args.measure, disk_path=args.disk_path)
    if args.measure and not hw.gpus:
        hw = measure_cpu_decode(hw)
    if args.json:
        print(json.dumps(hw.to_json(), indent=1))
    else:
        Console().print(hardware_table(hw))
    return 0


def measure_cpu_decode(hw: Any) -> Any:
    """The fixed costs of CPU decode (engine step, decoder layer), measured through the engine on
    a small synthetic model and cached with the link rates: the speed model's CPU terms."""
    from spillover.bench.overhead import measure_decode_overhead
    from spillover.hw.probe import apply_measurements, load_measurements, save_measurements

    measured = load_measurements(hw) or {}
    gemv = measured.get("cpu_gemv") or hw.links.host_mem
    overhead = measure_decode_overhead(gemv, hw.cpu.threads)
    save_measurements(hw, {**measured, **overhead})
    return apply_measurements(hw, overhead)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry for these two commands (`python -m spillover.cli.plan plan qwen3-8b`)."""
    parser = argparse.ArgumentParser(prog="spillover")
    add_plan_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
