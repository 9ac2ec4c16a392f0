"""`spillover` command line: serve | chat | generate | plan | probe | convert | bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from spillover.config import UnsupportedArchitectureError
from spillover.weights.loader import WeightLoadError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model folder or .gguf file (default: the built-in demo model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quant", default=None, choices=["int8", "int4", "fp8", "native"],
                   help="quantize weights at load (native: keep a GGUF file's own 4/8-bit blocks)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _params(args: argparse.Namespace) -> Any:
    from spillover.engine.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _load(args: argparse.Namespace) -> Any:
    from spillover.llm import LLM

    return LLM(model=args.model, device=args.device, dtype=args.dtype, quant=args.quant)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _params(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate([args.prompt], params)[0]
    print(out.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("spillover chat — empty line or Ctrl-D to quit, /reset to clear the conversation")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        text = ""
        for delta in llm.stream_chat(history, params):
            print(delta, end="", flush=True)
            text += delta
        print()
        history.append({"role": "assistant", "content": text})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillover", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log kernel choices and loading")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the text")
    _model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(g, 128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive terminal chat that streams tokens")
    _model_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)

    # Sub-commands owned by other packages register themselves when present.
    for module, fn in (("spillover.cli.plan", "add_plan_parsers"), ("spillover.cli.convert", "add_convert_parser"),
                       ("spillover.cli.serve", "add_serve_parser"), ("spillover.cli_bench", "add_bench_parser")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        getattr(mod, fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (FileNotFoundError, UnsupportedArchitectureError, WeightLoadError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
