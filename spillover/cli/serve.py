"""`spillover serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
import time
from typing import Any

from spillover.cli.args import add_model_args, llm_kwargs

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
HEADER_TIMEOUT_S = 10  # a new connection must have sent its request headers by then
FLUSH_S = 5  # after the drain: for responses to reach their clients


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for "
                        "every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("SPILLOVER_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: "
                        "$SPILLOVER_API_KEY, else open)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: from MODEL)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt + answer) served, in tokens (default: the "
                        "model's own limit)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests decoded together (default: as many as the cache budget holds at "
                        "256 tokens each, at most 64 on the CPU and 256 on a GPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per forward pass, prefill chunks included (default 2048)")
    p.add_argument("--max-queue-len", type=int, default=1024, help="waiting requests before 429")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache blocks of 16 tokens (default: from the memory plan: 1 GiB on "
                        "the CPU, half the free GPU memory)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV cache of a prompt prefix seen before")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests (Jinja from clients: trusted clients "
                        "only)")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="enable CORS for these browser origins, comma-separated "
                        "(e.g. https://a.example,https://b.example, or * for any; default: off)")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per HTTP request (uvicorn's access log; default: off)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="server and engine log level (default warning)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C: stop admitting requests (503) and let running ones "
                        "finish for up to S seconds, then end them with an error (default 30)")
    p.set_defaults(func=cmd_serve)


def served_name(model: str | None, override: str | None) -> str:
    if override:
        return override
    if model is None:
        return DEMO_MODEL_NAME
    return os.path.basename(os.path.normpath(model)) or model


def page_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens: a wildcard bind is reached through loopback."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}/"


def parse_origins(value: str | None) -> list[str] | None:
    """`--allowed-origins a,b` -> ["a", "b"]; None (or only commas) -> None: CORS off."""
    origins = [o.strip() for o in (value or "").split(",") if o.strip()]
    return origins or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: may be reachable from elsewhere


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine with no API key, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"spillover: warning: listening on {host}, which other machines may reach, with no "
            "API key: anyone who can connect can use the model. Set --api-key (or "
            "$SPILLOVER_API_KEY), or bind --host 127.0.0.1.")


def make_loader(args: argparse.Namespace) -> Any:
    def load() -> Any:
        from spillover.engine.engine import EngineConfig
        from spillover.llm import LLM

        llm = LLM(**llm_kwargs(args), max_model_len=args.max_model_len)
        seqs = args.max_num_seqs
        if seqs is None:
            seqs, why = planned_max_num_seqs(llm)
            print(f"spillover: --max-num-seqs {seqs} ({why})", flush=True)
        config = EngineConfig(max_num_seqs=seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              num_kv_blocks=args.num_kv_blocks,
                              enable_prefix_caching=not args.no_prefix_caching,
                              max_model_len=args.max_model_len, max_queue_len=args.max_queue_len,
                              enforce_eager=args.enforce_eager)
        engine = llm.make_engine(config)
        engine.tokenizer  # noqa: B018 - load the tokenizer now, not on the first request
        print(f"spillover: warm-up {warm_up(engine):.1f} s", flush=True)
        return engine

    return load


def planned_max_num_seqs(llm: Any) -> tuple[int, str]:
    """The default --max-num-seqs from the memory plan of the loaded model on its device."""
    import torch

    from spillover.engine.memory import device_hardware
    from spillover.plan.engine_cache import default_max_num_seqs

    dtype_bytes = torch.empty(0, dtype=llm.dtype).element_size()
    return default_max_num_seqs(llm.config, device_hardware(llm.device), dtype_bytes,
                                llm.engine_config.kv_cache_memory_bytes)


def warm_up(engine: Any) -> float:
    """Greedy requests through the engine before the ready line, so that the first client does
    not pay for first-call costs (kernel choices, allocator growth, lazy imports); on a GPU,
    prompts long enough for the prefill kernels too (a GEMM above a few rows, chunked linear
    attention; Triton compiles each once per machine, then reads its cache), at a length that
    is a multiple of 16 and one that is not (Triton specialises on it). Returns its seconds."""
    from spillover.engine.params import SamplingParams

    t0 = time.perf_counter()
    lengths = [2]
    if engine.device.type == "cuda":
        cap = min(engine.config.max_num_batched_tokens, engine.max_model_len - 4)
        lengths += sorted({n for n in (min(cap, 256), min(cap, 129)) if n > 2})
    for i, n in enumerate(lengths):
        engine.add_request(f"spillover-warm-up-{i}", [i % 7 + 1] * n,
                           SamplingParams(max_tokens=2, temperature=0))
    while engine.has_unfinished():
        engine.step()
    graphs = engine.runner.graphs
    if graphs is not None:  # every batch size's CUDA graphs, so no client waits for a capture
        graphs.capture_all()
    return time.perf_counter() - t0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from spillover.server.api import create_app
    from spillover.server.serving import ServerState

    started = time.monotonic()
    name = served_name(args.model, args.served_model_name)
    aliases = {args.model} if args.model else set()
    state = ServerState(model_name=name, aliases=aliases, api_key=args.api_key,
                        trust_request_chat_template=args.trust_request_chat_template)
    server: Any = None
    exit_code = 0

    def on_ready() -> None:
        # after the engine's warm-up: the first request is served at full speed
        page = page_url(args.host, args.port)
        print(f"spillover: ready in {time.monotonic() - started:.1f} s from start: {name} at "
              f"{page} (chat page; OpenAI API at {page}v1). "
              f"Ctrl-C or SIGTERM stops it, letting running requests finish for up to "
              f"{args.shutdown_timeout:g} s", flush=True)

    def on_fatal(message: str) -> None:
        nonlocal exit_code
        print(f"spillover: error: {message}", file=sys.stderr, flush=True)
        exit_code = 1
        server.should_exit = True

    app = create_app(state, make_loader(args), on_ready=on_ready, on_fatal=on_fatal,
                     allowed_origins=parse_origins(args.allowed_origins))
    logging.getLogger("spillover").setLevel(args.log_level.upper())
    warning = exposure_warning(args.host, args.api_key)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"spillover: loading {name} for http://{args.host}:{args.port}/v1 (GET /health is "
          "503 until loaded)",
          flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=FLUSH_S,
                            timeout_keep_alive=KEEP_ALIVE_S, http=header_timeout_h11())
    if args.access_log:
        # Access lines are INFO: shown even when --log-level hides uvicorn's other INFO lines.
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = draining_server(config, state, args.shutdown_timeout)
    server.run()
    return exit_code


def header_timeout_h11() -> type:
    """uvicorn's h11 protocol, plus closing connections that send no request headers within
    HEADER_TIMEOUT_S (uvicorn times out idle connections only between requests)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
                HEADER_TIMEOUT_S, self._header_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


def draining_server(config: Any, state: Any, shutdown_timeout: float) -> Any:
    """A uvicorn server whose first SIGTERM / SIGINT drains the engine before shutting down:
    new requests get 503 with Retry-After, running ones finish for up to `shutdown_timeout`
    seconds, those left end with an error (an error event and [DONE] for a stream). A second
    signal exits at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        draining = False
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            bridge = state.bridge
            if self.draining or bridge is None or not bridge.alive or self.loop is None:
                super().handle_exit(sig, frame)
                return
            self.draining = True
            bridge.draining = True  # at once: the next request already gets 503
            name = signal.Signals(sig).name
            print(f"spillover: {name}: draining {bridge.num_open} open requests (up to "
                  f"{shutdown_timeout:g} s; send it again to stop at once)", flush=True)
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            cut = await state.bridge.drain(shutdown_timeout)
            if cut:
                print(f"spillover: ended {cut} requests still open after {shutdown_timeout:g} s",
                      flush=True)
            self.should_exit = True

    return DrainingServer(config)
