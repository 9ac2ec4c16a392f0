"""`spillover serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from spillover.cli.args import add_model_args, llm_kwargs

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SPILLOVER_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: "
                        "$SPILLOVER_API_KEY, else open)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: from MODEL)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-queue-len", type=int, default=1024, help="waiting requests before 429")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--trust-request-chat-template", action="store_true")  # untrusted Jinja
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def served_name(model: str | None, override: str | None) -> str:
    if override:
        return override
    if model is None:
        return DEMO_MODEL_NAME
    return os.path.basename(os.path.normpath(model)) or model


def make_loader(args: argparse.Namespace) -> Any:
    def load() -> Any:
        from spillover.engine.engine import EngineConfig
        from spillover.llm import LLM

        llm = LLM(**llm_kwargs(args), max_model_len=args.max_model_len)
        config = EngineConfig(max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              num_kv_blocks=args.num_kv_blocks,
                              enable_prefix_caching=not args.no_prefix_caching,
                              max_model_len=args.max_model_len, max_queue_len=args.max_queue_len)
        engine = llm.make_engine(config)
        engine.tokenizer  # noqa: B018 - load the tokenizer now, not on the first request
        return engine

    return load


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from spillover.server.api import create_app
    from spillover.server.serving import ServerState

    name = served_name(args.model, args.served_model_name)
    aliases = {args.model} if args.model else set()
    state = ServerState(model_name=name, aliases=aliases, api_key=args.api_key,
                        trust_request_chat_template=args.trust_request_chat_template)
    app = create_app(state, make_loader(args))
    logging.getLogger("spillover").setLevel(args.log_level.upper())
    print(f"spillover: serving {name} on http://{args.host}:{args.port}/v1 (GET /health is "
          "503 until loaded)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=5)
    return 0
