"""`spillover bench`: prefill and decode speed, time to first token and memory, through the engine.

    spillover bench Qwen/Qwen3-Next-80B-A3B-Instruct --synthetic --layers 8 --json out.json
    spillover bench path/to/model --prompt-lens 512,8192 --batches 1,8

With `--synthetic`, MODEL is a catalog name, hub id or config.json, and the weights are random,
built directly in their served format (spillover.bench.synthetic): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from spillover.cli.args import add_model_args, budget_kwargs, llm_kwargs


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="prefill / decode tok/s, time to first token and memory of a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("synthetic weights")
    g.add_argument(
        "--synthetic",
        action="store_true",
        help="random weights in their final format from MODEL's config (catalog name, hub id or "
        "config.json); --quant auto means int4",
    )
    g.add_argument(
        "--layers", type=int, default=None, help="keep this many layers (same layer pattern)"
    )
    g.add_argument("--group-size", type=int, default=128, help="int4 group size")
    g.add_argument(
        "--routing-skew",
        type=float,
        default=0.0,
        help="0 routes uniformly (random routers); larger values favour some experts per layer, "
        "as real routers do",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    r = p.add_argument_group("what to measure")
    r.add_argument(
        "--prompt-lens", type=_ints, default=[512, 8192], help="prefill lengths (default 512,8192)"
    )
    r.add_argument("--batches", type=_ints, default=[1, 8], help="decode batch sizes (default 1,8)")
    r.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per batch")
    r.add_argument("--decode-context", type=int, default=128, metavar="N",
                   help="prompt tokens of each decode request, prefilled before the timed steps "
                        "(default 128; 32768 measures decode after a 32K context)")
    r.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="the engine's prefill chunk"
    )
    r.add_argument(
        "--json", dest="json_path", default=None, metavar="FILE", help="also write the result here"
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from spillover.bench.run import print_report, run_bench, write_json

    llm, info = _load(args)
    result = {
        **info,
        **run_bench(llm, args.prompt_lens, args.batches, args.decode_tokens, seed=args.seed,
                    decode_prompt_len=args.decode_context),
    }
    print_report(
        result,
        f"spillover bench {info['model']} ({info['device']}, {info['dtype']}, "
        f"{info['quant']}{', synthetic' if info['synthetic'] else ''})",
    )
    if args.json_path:
        write_json(result, args.json_path)
        print(f"wrote {args.json_path}")
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(LLM, what the result says about the model and the machine)."""
    import torch

    from spillover.llm import LLM, resolve_device, resolve_dtype

    t0 = time.perf_counter()
    info: dict[str, Any] = {"model": args.model, "synthetic": bool(args.synthetic)}
    if args.synthetic:
        from spillover.bench.synthetic import (
            build_synthetic,
            load_synthetic_config,
            routing_concentration,
            with_layers,
        )

        if args.model is None:
            raise ValueError("--synthetic needs MODEL: a catalog name, hub id or config.json")
        cfg = load_synthetic_config(args.model)
        if args.layers is not None:
            cfg = with_layers(cfg, args.layers)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        quant = "int4" if args.quant == "auto" else args.quant
        budgets = args.gpu_memory is not None or args.cpu_memory is not None
        # With budgets the experts start on the CPU and the placement moves each to its tier.
        model = build_synthetic(
            cfg, torch.device("cpu") if budgets else device, dtype, quant, args.group_size,
            args.seed, routing_skew=args.routing_skew
        )
        llm = LLM.from_model(
            model, cfg, device, dtype, max_num_batched_tokens=args.max_num_batched_tokens,
            enforce_eager=args.enforce_eager, **budget_kwargs(args),
        )
        info.update(
            quant=quant,
            group_size=args.group_size,
            routing_skew=args.routing_skew,
            routing_top10_share=routing_concentration(model, seed=args.seed),
        )
    else:
        if args.layers is not None:
            raise ValueError("--layers needs --synthetic (a real checkpoint keeps its layers)")
        llm = LLM(**llm_kwargs(args), max_num_batched_tokens=args.max_num_batched_tokens)
        info["quant"] = args.quant
    cfg = llm.config
    info.update(
        load_s=time.perf_counter() - t0,
        device=str(llm.device),
        device_name=torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
        dtype=str(llm.dtype).removeprefix("torch."),
        config={
            "model_type": cfg.model_type,
            "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "full_attention_layers": len(cfg.attention_layers),
            "vocab_size": cfg.vocab_size,
        },
    )
    return llm, info
