"""Arguments shared by the sub-commands: the model to load, `--quant`, sampling."""

from __future__ import annotations

import argparse
from typing import Any

from spillover.offload.residency import POLICIES
from spillover.quant import QUANT_CHOICES, normalize_quant

LOAD_QUANT_HELP = (
    "weight format (default auto: keep the checkpoint's own; a GGUF is dequantized unless "
    "native); bf16: no quantization; fp8 / int8 / int4: quantize every float matrix while "
    "loading; int4-experts: int4 routed experts, int8 the rest; native: keep a GGUF file's "
    "own 4/8-bit blocks"
)


def quant_type(value: str) -> str:
    """argparse `type` for `--quant`: legacy spellings (none, keep) map onto QUANT_CHOICES."""
    try:
        return normalize_quant(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_quant_arg(p: argparse._ActionsContainer, default: str = "auto",
                  help_text: str = LOAD_QUANT_HELP) -> None:
    """`--quant`, the same QUANT_CHOICES for every command (one that cannot apply a
    choice says so)."""
    p.add_argument("--quant", type=quant_type, choices=QUANT_CHOICES, default=default,
                   help=help_text)


def add_model_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """MODEL, --device, --dtype, --quant: what `LLM(...)` takes (see llm_kwargs). Returns the group,
    where arguments about loading the model belong (the memory budgets
    --gpu-memory / --cpu-memory)."""
    p.add_argument("model", nargs="?", default=None,
                   help="a hub id (Org/Name: planned for this machine, then downloaded into the "
                        "Hugging Face cache), a model folder or a .gguf file "
                        "(default: the built-in demo model)")
    g = p.add_argument_group("model loading")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (default auto: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default auto: bfloat16 on a GPU, float32 on the CPU)")
    add_quant_arg(g)
    g.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (debugging; "
                        "graphs are only used on CUDA)")
    add_hub_args(g)
    add_budget_args(p)
    return g


def add_hub_args(g: argparse._ActionsContainer) -> None:
    """--revision and --gguf-file: which version and file of a hub id."""
    g.add_argument("--revision", default=None,
                   help="hub id only: a branch, tag or commit of the repo (default: main)")
    g.add_argument("--gguf-file", default=None, metavar="FILE",
                   help="hub id of a GGUF repo: the file to use (default: the largest "
                        "quantization the plan fits on this machine)")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """Memory budgets and the tiered experts' options (a MoE model bigger than the GPU)."""
    b = p.add_argument_group("memory budgets (MoE experts go to GPU slots, pinned RAM, disk)")
    b.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="GPU memory this process may hold: 32GiB, 30GB, bytes, or a fraction "
                        "of the card (0.9); the planner fits dense weights, caches and "
                        "expert slots in it")
    b.add_argument("--cpu-memory", default=None, metavar="SIZE",
                   help="RAM for weights (60GB, 0.5, ...): experts beyond it are read from disk")
    b.add_argument("--expert-policy", default="lrfu", choices=sorted(POLICIES),
                   help="which experts keep GPU slots: lru, lfu, lrfu (recency and frequency), "
                        "static (never change; best with --expert-stats)")
    b.add_argument("--expert-stats", default=None, metavar="FILE",
                   help="routing statistics from `spillover profile`: hottest experts placed first")
    b.add_argument("--expert-misses", default="auto", choices=["auto", "copy", "cpu", "mapped"],
                   help="a decode miss: copied into a slot, computed by the CPU, read from RAM "
                        "across the link by the GPU's kernels (mapped: no host decision, the whole "
                        "step in one CUDA graph), or as the policy advises (auto)")


def budget_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"gpu_memory": args.gpu_memory, "cpu_memory": args.cpu_memory,
            "expert_policy": args.expert_policy, "expert_misses": args.expert_misses}


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM(...)` keywords that add_model_args' arguments give."""
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "quant": args.quant,
            **budget_kwargs(args), "expert_stats": args.expert_stats,
            "revision": args.revision, "gguf_file": args.gguf_file,
            "enforce_eager": args.enforce_eager}


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; 0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this much "
                        "probability (default 1.0: all)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k likeliest tokens (default 0: no limit)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, for repeatable sampling (default: none)")


def sampling_params(args: argparse.Namespace) -> Any:
    from spillover.engine.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)
