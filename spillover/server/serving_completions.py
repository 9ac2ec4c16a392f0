"""POST /v1/completions: prompts (text, token ids, or lists of them), echo, legacy logprobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from spillover.server.protocol import APIError, CompletionRequest
from spillover.server.serving import (
    AbortingStream,
    Run,
    ServerState,
    Sub,
    check_prompt_chars,
    chosen_logprob,
    new_id,
    resolve_max_tokens,
    sampling_params,
    sse,
    sse_stream,
    top_entries,
)


@dataclass
class LegacyLogprobs:
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, state: ServerState, token: int, lp: dict[int, float] | None, k: int,
            offset: int) -> int:
        s = state.token_str(token)
        self.tokens.append(s)
        self.token_logprobs.append(None if lp is None else chosen_logprob(lp, token))
        self.top_logprobs.append(
            None if lp is None else {state.token_str(i): v for i, v in top_entries(state, lp, k)})
        self.text_offset.append(offset)
        return offset + len(s)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def _prepare(state: ServerState, req: CompletionRequest) -> tuple[Run, list[str]]:
    state.check_model(req.model)
    subs, texts = [], []
    for i, p in enumerate(req.prompts()):
        if isinstance(p, str):
            check_prompt_chars(state, len(p), "prompt")
            ids = list(state.tokenizer(p, add_special_tokens=False).input_ids)
            text = p
        else:
            if any(not 0 <= t < state.vocab_size for t in p):
                raise APIError(400, "prompt token ids must lie in the vocabulary", param="prompt")
            ids, text = list(p), state.tokenizer.decode(p)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        max_tokens = resolve_max_tokens(state, len(ids), req.max_tokens, "max_tokens")
        # Echo with logprobs needs the prompt's logprobs too (the legacy API returns them).
        plp = req.logprobs if (req.echo and req.logprobs is not None) else req.prompt_logprobs
        params = sampling_params(state, req, max_tokens, req.logprobs, prompt_logprobs=plp)
        subs.append(Sub(new_id("cmpl"), ids, params, base_index=i * req.n))
        texts.append(text)
    return Run(state, subs), texts


async def create_completion(state: ServerState, req: CompletionRequest, header_id: str) -> Any:
    # tokenizing off the event loop
    run, prompt_texts = await asyncio.to_thread(_prepare, state, req)
    request_id = run.subs[0].request_id
    meta = {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "system_fingerprint": None}
    headers = {"X-Request-Id": header_id}
    if req.stream:
        await run.start()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        def events() -> AsyncIterator[str]:
            return _stream(state, req, run, prompt_texts, meta, include_usage)

        return AbortingStream(sse_stream(run, events), run, headers)
    total = len(run.subs) * req.n
    texts = [""] * total
    finish: list[str | None] = [None] * total
    stops: list[str | int | None] = [None] * total
    lps = [LegacyLogprobs() for _ in range(total)]
    offsets = [0] * total
    tokens = 0
    try:
        await run.start()
        async for sub, ev in run.events_iter():
            i = sub.base_index + ev.index
            if req.echo and not texts[i]:
                texts[i] = prompt_texts[sub.base_index // req.n]
                offsets[i] = _echo_logprobs(state, req, sub, ev, lps[i])
            texts[i] += ev.new_text
            tokens += len(ev.new_token_ids)
            if req.logprobs is not None:
                for tok, lp in zip(ev.new_token_ids, ev.logprobs or [], strict=False):
                    offsets[i] = lps[i].add(state, tok, lp, req.logprobs, offsets[i])
            if ev.finished:
                finish[i], stops[i] = ev.finish_reason, ev.stop_reason
    finally:
        run.close()
    choices = [{"index": i, "text": texts[i],
                "logprobs": lps[i].as_dict() if req.logprobs is not None else None,
                "finish_reason": finish[i], "stop_reason": stops[i]} for i in range(total)]
    return JSONResponse({**meta, "choices": choices, "usage": run.usage(tokens)}, headers=headers)


def _echo_logprobs(state: ServerState, req: CompletionRequest, sub: Sub, ev: Any,
                   lp: LegacyLogprobs) -> int:
    """Adds the prompt's tokens to the legacy logprobs; returns the text offset after them."""
    offset = 0
    if req.logprobs is None:
        return offset
    plps = ev.prompt_logprobs or [None] * len(sub.prompt_ids)
    for tok, d in zip(sub.prompt_ids, plps, strict=False):
        offset = lp.add(state, tok, d, req.logprobs, offset)
    return offset


async def _stream(state: ServerState, req: CompletionRequest, run: Run, prompt_texts: list[str],
                  meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    echoed: set[int] = set()
    tokens = 0
    offsets: dict[int, int] = {}
    async for sub, ev in run.events_iter():
        i = sub.base_index + ev.index
        lp = LegacyLogprobs()
        text = ev.new_text
        if req.echo and i not in echoed:
            echoed.add(i)
            text = prompt_texts[sub.base_index // req.n] + text
            offsets[i] = _echo_logprobs(state, req, sub, ev, lp)
        tokens += len(ev.new_token_ids)
        if req.logprobs is not None:
            for tok, d in zip(ev.new_token_ids, ev.logprobs or [], strict=False):
                offsets[i] = lp.add(state, tok, d, req.logprobs, offsets.get(i, 0))
        if text or lp.tokens:
            lp_dict = lp.as_dict() if req.logprobs is not None else None
            yield sse({**meta, "choices": [{"index": i, "text": text, "finish_reason": None,
                                            "logprobs": lp_dict}]})
        if ev.finished:
            yield sse({**meta, "choices": [{"index": i, "text": "", "logprobs": None,
                                            "finish_reason": ev.finish_reason,
                                            "stop_reason": ev.stop_reason}]})
    if include_usage:
        yield sse({**meta, "choices": [], "usage": run.usage(tokens)})
