"""What chat and completions share: server state, request -> SamplingParams, running requests on the
engine with abort on disconnect, SSE framing, usage and logprob shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from spillover.engine.outputs import QueueFullError
from spillover.engine.params import SamplingParams
from spillover.server.bridge import EngineBridge, EngineDead
from spillover.server.grammar import GrammarCompiler
from spillover.server.metrics import RequestTimer, ServerMetrics
from spillover.server.protocol import APIError, _SamplingRequest

RETRY_AFTER_S = "1"


@dataclass
class ServerState:
    model_name: str
    aliases: set[str] = field(default_factory=set)
    api_key: str | None = None
    engine: Any = None
    bridge: EngineBridge | None = None
    tokenizer: Any = None
    grammar: GrammarCompiler | None = None
    metrics: ServerMetrics | None = None
    max_model_len: int = 0
    vocab_size: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None
    # `chat_template_kwargs.chat_template` replaces the model's template: untrusted code, off
    # unless `serve --trust-request-chat-template`.
    trust_request_chat_template: bool = False

    @property
    def ready(self) -> bool:
        return self.bridge is not None and self.bridge.alive

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name and model not in self.aliases:
            raise APIError(404, f"The model `{model}` does not exist.", type_="not_found_error",
                           param="model", code="model_not_found")

    def token_str(self, token_id: int) -> str:
        return _decode_one(self.tokenizer, token_id)

    @property
    def max_prompt_chars(self) -> int:
        """More characters than any prompt that fits the context can hold."""
        return max(self.max_model_len, 1) * MAX_CHARS_PER_TOKEN


# A generous bound on characters per token (tokens average ~4; long whitespace runs and repeated
# punctuation merge into longer ones): a prompt longer than max_model_len x this cannot fit, and is
# refused before tokenizing it (a 30 MB prompt took half a minute to tokenize).
MAX_CHARS_PER_TOKEN = 64


def check_prompt_chars(state: ServerState, n_chars: int, param: str) -> None:
    if n_chars > state.max_prompt_chars:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} "
                            f"tokens, and the prompt has {n_chars} characters: more than any "
                            "prompt that fits.",
                       param=param, code="context_length_exceeded")


@lru_cache(maxsize=65536)
def _decode_cached(tok_key: int, token_id: int) -> str:
    return _TOKENIZERS[tok_key].decode([token_id])


_TOKENIZERS: dict[int, Any] = {}


def _decode_one(tokenizer: Any, token_id: int) -> str:
    _TOKENIZERS.setdefault(id(tokenizer), tokenizer)
    return _decode_cached(id(tokenizer), token_id)


def new_id(prefix: str) -> str:
    # A client-chosen X-Request-Id is echoed back but never used as the engine key (it
    # could collide).
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(state: ServerState, req: _SamplingRequest, max_tokens: int,
                    logprobs: int | None, prompt_logprobs: int | None = None,
                    processors: list[Any] | None = None) -> SamplingParams:
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        try:
            tid = int(k)
        except ValueError:
            raise APIError(400, f"logit_bias key {k!r} is not a token id",
                           param="logit_bias") from None
        if not 0 <= tid < state.vocab_size:
            raise APIError(400, f"logit_bias token id {tid} is outside the vocabulary "
                                f"(0..{state.vocab_size - 1})",
                           param="logit_bias")
        bias[tid] = v
    for t in req.stop_token_ids or []:
        if not 0 <= t < state.vocab_size:
            raise APIError(400, f"stop_token_ids: {t} is outside the vocabulary",
                           param="stop_token_ids")
    if req.min_tokens > max_tokens:
        raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            logit_bias=bias, seed=req.seed, n=req.n, stop=req.stop_list(),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logits_processors=list(processors or []))
    except ValueError as e:
        raise APIError(400, str(e)) from None


def resolve_max_tokens(state: ServerState, prompt_len: int, requested: int | None,
                       param: str) -> int:
    limit = state.max_model_len
    if prompt_len >= limit or (requested is not None and prompt_len + requested > limit):
        raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                            "However, you requested "
                       f"{requested or 0} output tokens and your prompt contains {prompt_len} "
                       f"input tokens, for a total of {prompt_len + (requested or 0)} tokens.",
                       param=param if prompt_len < limit else "messages",
                       code="context_length_exceeded")
    return requested if requested is not None else limit - prompt_len


@dataclass
class Sub:
    """One engine request of an HTTP request (completions with several prompts have several)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    base_index: int = 0


class Run:
    """The engine requests behind one HTTP request, their merged events, and their cleanup."""

    def __init__(self, state: ServerState, subs: list[Sub]) -> None:
        assert state.bridge is not None and state.metrics is not None
        self.state, self.bridge, self.subs = state, state.bridge, subs
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.by_id = {s.request_id: s for s in subs}
        self.expected = sum(s.params.n for s in subs)
        self.finished = 0
        self.timer = RequestTimer(state.metrics, time.monotonic())
        self.cached: dict[str, int] = {}
        self.completed = False
        self._closed = False

    async def start(self) -> None:
        try:
            for s in self.subs:
                await self.bridge.submit(s.request_id, s.prompt_ids, s.params, events=self.events)
        except ValueError as e:
            self.abort()
            msg = str(e)
            code = "context_length_exceeded" if "context length" in msg else "invalid_value"
            raise APIError(400, msg[:500], code=code) from None
        except QueueFullError:
            self.abort()
            raise APIError(429, "The server is busy: its request queue is full. Retry shortly.",
                           type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": RETRY_AFTER_S}) from None
        except EngineDead as e:
            self.abort()
            raise APIError(503, str(e), type_="server_error", code="engine_unavailable",
                           headers={"Retry-After": RETRY_AFTER_S}) from None

    async def events_iter(self) -> AsyncIterator[tuple[Sub, Any]]:
        while self.finished < self.expected:
            ev = await self.events.get()
            if isinstance(ev, BaseException):
                raise ev
            sub = self.by_id[ev.request_id]
            self.cached[ev.request_id] = max(self.cached.get(ev.request_id, 0),
                                             ev.num_cached_tokens)
            self.timer.tokens_arrived(time.monotonic(), len(ev.new_token_ids))
            if ev.finished:
                self.finished += 1
                if self.finished == self.expected:
                    self.completed = True
                    self.timer.done(time.monotonic(), sum(len(s.prompt_ids) for s in self.subs),
                                    ev.finish_reason or "stop")
            yield sub, ev

    def abort(self) -> None:
        for s in self.subs:
            self.bridge.abort(s.request_id)

    def close(self) -> None:
        """Called in `finally`: whatever did not finish is aborted, freeing its blocks at once."""
        if self._closed:
            return
        self._closed = True
        if not self.completed:
            self.abort()
            assert self.state.metrics is not None
            self.state.metrics.disconnected.inc()

    def usage(self, completion_tokens: int, reasoning_tokens: int | None = None) -> dict[str, Any]:
        prompt = sum(len(s.prompt_ids) for s in self.subs)
        u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                             "total_tokens": prompt + completion_tokens,
                             "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}
        if reasoning_tokens is not None:
            u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return u


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work` unless the client goes away first; then `work` is cancelled (its
    finally aborts)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise APIError(499, "client disconnected", code="client_disconnected")
    return task.result()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class AbortingStream(StreamingResponse):
    """A stream whose engine requests are aborted however the response ends, even if the body
    generator never got to run (client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[str], run: Run, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()


async def sse_stream(run: Run, body: Callable[[], AsyncIterator[str]]) -> AsyncIterator[str]:
    """Frames a stream; errors after the 200 went out become one `data: {"error": ...}` event."""
    try:
        async for chunk in body():
            yield chunk
    except APIError as e:
        yield sse(e.body())
    except EngineDead as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None,
                             "code": None}})
    finally:
        run.close()
    yield "data: [DONE]\n\n"


def top_entries(state: ServerState, lp: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])[:k]


def chosen_logprob(lp: dict[int, float], token: int) -> float:
    return float(lp.get(token, float("-inf")))
