"""The `spillover` command line (and `python -m spillover`): one static parser.

Each sub-command module of spillover/cli exports `add_*_parser(sub)`, imported and called here.
Arguments shared by the commands (the model, --device, --dtype, --quant, sampling) live in
cli/args.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from spillover.cli.args import add_model_args, add_sampling_args, llm_kwargs, sampling_params
from spillover.cli.bench import add_bench_parser
from spillover.cli.convert import add_convert_parser
from spillover.cli.deploy import add_deploy_parser
from spillover.cli.plan import add_plan_parsers
from spillover.cli.profile import add_profile_parser
from spillover.cli.serve import add_serve_parser
from spillover.config import UnsupportedArchitectureError
from spillover.weights.loader import WeightLoadError


def _load(args: argparse.Namespace) -> Any:
    from spillover.llm import LLM

    return LLM(**llm_kwargs(args))


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = sampling_params(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate([args.prompt], params)[0]
    print(out.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = sampling_params(args)
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
            # Say so: a silent reset looks like the command was ignored.
            print("(conversation cleared)")
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
    parser = argparse.ArgumentParser(prog="spillover",
                                     description="Run, serve, plan and convert LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log kernel choices and loading")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the text")
    add_model_args(g)
    g.add_argument("--prompt", required=True, help="the text to complete")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template")
    add_sampling_args(g, 128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive terminal chat that streams tokens")
    add_model_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)

    add_serve_parser(sub)
    add_plan_parsers(sub)  # plan and probe
    add_convert_parser(sub)
    add_profile_parser(sub, add_model_args)
    add_bench_parser(sub)
    add_deploy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (FileNotFoundError, UnsupportedArchitectureError, WeightLoadError, ValueError,
            RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
