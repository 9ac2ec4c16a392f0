"""The FastAPI app: routes, auth, error envelope, readiness, and the engine's start-up.

Bodies are read and validated by hand (not by FastAPI's signature magic) so that every client
mistake, malformed JSON included, becomes OpenAI's error envelope with a 400 and a `param`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from spillover.server.bridge import EngineBridge, EngineDead
from spillover.server.chat import render_messages
from spillover.server.grammar import GrammarCompiler
from spillover.server.metrics import ServerMetrics
from spillover.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    openapi_request_body,
    parse,
    request_schemas,
)
from spillover.server.protocol_responses import ResponsesRequest
from spillover.server.serving import (
    RETRY_AFTER_S,
    ServerState,
    check_prompt_chars,
    new_id,
    until_disconnect,
)
from spillover.server.serving_chat import check_tools_supported, create_chat_completion
from spillover.server.serving_completions import create_completion
from spillover.server.serving_responses import create_response

log = logging.getLogger("spillover.server")
MAX_BODY_BYTES = 32 * 1024 * 1024

# Returns a started-ready engine (Engine API:
# add_request/abort/step/has_unfinished/stats/tokenizer).
EngineLoader = Callable[[], Any]


def attach_engine(state: ServerState, engine: Any, loop: asyncio.AbstractEventLoop,
                  on_death: Callable[[BaseException], None] | None = None) -> None:
    state.engine = engine
    state.tokenizer = engine.tokenizer
    state.max_model_len = int(engine.max_model_len)
    mc = getattr(engine, "model_config", None)
    state.vocab_size = int(getattr(mc, "vocab_size", 0) or len(engine.tokenizer))
    eos = [int(e) for e in getattr(mc, "eos_token_ids", ())] or [int(engine.tokenizer.eos_token_id)]
    state.grammar = GrammarCompiler(engine.tokenizer, state.vocab_size, eos)
    bridge = EngineBridge(engine, loop, on_death=on_death)
    state.metrics = ServerMetrics(state.model_name, lambda: bridge.stats)
    bridge.start()
    state.bridge = bridge


def create_app(state: ServerState, loader: EngineLoader | None = None,
               on_ready: Callable[[], None] | None = None,
               on_fatal: Callable[[str], None] | None = None,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """`on_ready` runs on the loop once the engine serves; `on_fatal(message)` when the model
    cannot load or the engine thread died (`spillover serve` then exits non-zero).
    `allowed_origins`: browser origins allowed by CORS (`["*"]` for any); None: no CORS."""

    def died(e: BaseException) -> None:
        if on_fatal is not None:
            on_fatal(f"engine failed: {type(e).__name__}: {e}")

    def attach(engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        attach_engine(state, engine, loop, on_death=died)
        if on_ready is not None:
            on_ready()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if loader is not None:
            # Load in the background so /health can say 503 "loading" instead of
            # refusing connections.
            def load() -> None:
                try:
                    engine = loader()
                    loop.call_soon_threadsafe(attach, engine, loop)
                except Exception as e:
                    state.load_error = f"{type(e).__name__}: {e}"
                    if on_fatal is None:
                        log.exception("model loading failed")
                        return
                    log.debug("model loading failed", exc_info=True)  # the message is enough
                    loop.call_soon_threadsafe(on_fatal, f"model failed to load: {state.load_error}")
            threading.Thread(target=load, name="spillover-load", daemon=True).start()
        yield
        if state.bridge is not None:
            state.bridge.stop()

    app = FastAPI(title="spillover", version=spillover_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.spillover = state
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                request_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(EngineDead)
    async def _engine_dead(request: Request, exc: EngineDead) -> JSONResponse:
        err = APIError(503, str(exc), "unavailable_error", code="engine_unavailable")
        return JSONResponse(err.body(), status_code=503, headers={"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc)[:500]).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # Starlette's 405 carries the `Allow` header: keep it (and any other).
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type_).body(),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(APIError(500, f"internal server error: {type(exc).__name__}",
                                     "server_error").body(),
                            status_code=500)

    def auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "authentication_error",
                           code="invalid_api_key")

    def draining() -> bool:
        return state.bridge is not None and state.bridge.draining

    def need_ready() -> None:
        if draining():
            raise APIError(503, "the server is shutting down", "unavailable_error",
                           code="shutting_down", headers={"Retry-After": RETRY_AFTER_S})
        if not state.ready:
            if state.bridge is not None and state.bridge.error is not None:
                msg = f"engine failed: {state.bridge.error}"
            elif state.load_error:
                msg = f"model failed to load: {state.load_error}"
            else:
                msg = "Loading model"
            raise APIError(503, msg, "unavailable_error", code="model_not_ready",
                           headers={"Retry-After": RETRY_AFTER_S})

    async def body_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, "request body too large")
        # A 30 MB body takes a while to decode and check: off the event loop.
        return await asyncio.to_thread(decode_body, raw)

    def header_id(request: Request) -> str:
        return request.headers.get("x-request-id") or new_id("req")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        # The page itself needs no key (it asks for one); the API calls it makes do.
        return Response(chat_page_html(), media_type="text/html; charset=utf-8",
                        headers=CHAT_PAGE_HEADERS)

    @app.get("/health")
    async def health() -> Response:
        if state.ready and not draining():
            return JSONResponse({"status": "ok"})
        need_ready()
        return Response(status_code=503)  # unreachable: need_ready raised

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": spillover_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(state.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "spillover",
                "root": name, "parent": None, "max_model_len": state.max_model_len or None}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        auth(request)
        return {"object": "list", "data": [model_card(state.model_name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        auth(request)
        state.check_model(model_id)
        return model_card(state.model_name)

    @app.post("/v1/chat/completions", openapi_extra=openapi_request_body(ChatCompletionRequest))
    async def chat(request: Request) -> Any:
        auth(request)
        req = parse(await body_json(request), ChatCompletionRequest)
        need_ready()
        check_tools_supported(req)
        work = create_chat_completion(state, req, request, header_id(request))
        return await work if req.stream else await until_disconnect(request, work)

    @app.post("/v1/completions", openapi_extra=openapi_request_body(CompletionRequest))
    async def completions(request: Request) -> Any:
        auth(request)
        req = parse(await body_json(request), CompletionRequest)
        need_ready()
        work = create_completion(state, req, header_id(request))
        return await work if req.stream else await until_disconnect(request, work)

    @app.post("/v1/responses", openapi_extra=openapi_request_body(ResponsesRequest))
    async def responses(request: Request) -> Any:
        auth(request)
        req = parse(await body_json(request), ResponsesRequest)
        need_ready()
        work = create_response(state, req, header_id(request))
        return await work if req.stream else await until_disconnect(request, work)

    @app.post("/tokenize", openapi_extra=openapi_request_body(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        auth(request)
        req = parse(await body_json(request), TokenizeRequest)
        need_ready()
        state.check_model(req.model)

        def work() -> dict[str, Any]:  # CPU work: in a worker thread, off the event loop
            if req.messages is not None:
                check_prompt_chars(state, sum(len(m.text()) for m in req.messages), "messages")
                text = render_messages(state.tokenizer, req.messages, None,
                                       req.chat_template_kwargs or {},
                                       add_generation_prompt=req.add_generation_prompt,
                                       trust_request_template=state.trust_request_chat_template,
                                       max_chars=state.max_prompt_chars)
                check_prompt_chars(state, len(text), "messages")
                ids = list(state.tokenizer(text, add_special_tokens=False).input_ids)
            else:
                check_prompt_chars(state, len(req.prompt or ""), "prompt")
                ids = list(state.tokenizer(req.prompt,
                                           add_special_tokens=req.add_special_tokens).input_ids)
            return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                    "token_strs": [state.token_str(t) for t in ids]}

        return await asyncio.to_thread(work)

    @app.post("/detokenize", openapi_extra=openapi_request_body(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        auth(request)
        req = parse(await body_json(request), DetokenizeRequest)
        need_ready()
        state.check_model(req.model)
        if any(not 0 <= t < state.vocab_size for t in req.tokens):
            raise APIError(400, "token ids must lie in the vocabulary", param="tokens")
        return {"prompt": await asyncio.to_thread(state.tokenizer.decode, req.tokens)}

    return app


MAX_JSON_DEPTH = 128
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_body(raw: bytes) -> Any:
    """JSON -> Python, answering 400 (not 500) for bodies nested too deep and for strings holding
    lone surrogates (`"\\ud800"` is valid JSON but no valid text: the tokenizer raises on it)."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}"[:300],
                       code="invalid_json") from None
    except RecursionError:
        obj = None
        depth_ok = False
    else:
        depth_ok = True
    check_text = _SURROGATE_ESCAPE.search(raw) is not None
    # Iterative walk: the depth check itself must not recurse.
    stack: list[tuple[Any, int]] = [(obj, 1)] if depth_ok else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            depth_ok = False
            break
        if isinstance(node, dict):
            for k, v in node.items():
                if check_text:
                    _check_text(k)
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
                elif check_text and isinstance(v, str):
                    _check_text(v)
        elif isinstance(node, list):
            for v in node:
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
                elif check_text and isinstance(v, str):
                    _check_text(v)
    if not depth_ok:
        raise APIError(400, f"the body is nested more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json")
    return obj


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the body holds a string with a lone UTF-16 surrogate (e.g. "
                            "\"\\ud800\"), which is not valid text", code="invalid_text") from None


# The browser enforces the page's promise: it may talk to this server only, load nothing else.
CHAT_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@lru_cache(maxsize=1)
def chat_page_html() -> bytes:
    """The web chat page (package data: spillover/server/static/chat.html)."""
    from importlib.resources import files

    return (files("spillover.server") / "static" / "chat.html").read_bytes()


def spillover_version() -> str:
    """The installed package's version (the package root sits above the server's floor)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spillover")
    except PackageNotFoundError:
        return "0+unknown"
