"""POST /v1/chat/completions: template, constraints, engine run, and OpenAI-shaped output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from spillover.server.chat import render_messages, template_tool_format
from spillover.server.parsers import OutputParser, prompt_opens_thinking
from spillover.server.protocol import APIError, ChatCompletionRequest, NamedToolChoice
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
class Choice:
    parser: OutputParser
    tokens: int = 0
    reasoning_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


def _logprob_entries(state: ServerState, ev: Any, k: int) -> list[dict[str, Any]]:
    out = []
    for tok, lp in zip(ev.new_token_ids, ev.logprobs or [], strict=False):
        s = state.token_str(tok)
        out.append({"token": s, "logprob": chosen_logprob(lp, tok), "bytes": list(s.encode()),
                    "top_logprobs": [{"token": (t := state.token_str(i)), "logprob": v,
                                      "bytes": list(t.encode())}
                                     for i, v in top_entries(state, lp, k)]})
    return out


def prepare(state: ServerState,
            req: ChatCompletionRequest) -> tuple[Run, Callable[[], OutputParser]]:
    """Template, tokenization and grammar compilation: CPU work, run in a worker thread so the event
    loop keeps answering /health and streaming other requests meanwhile. Returns the engine run
    and a factory of output parsers (one per choice) set up for this template and request."""
    state.check_model(req.model)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort == "none":
        kwargs.setdefault("enable_thinking", False)
    parse_tools = bool(req.tools) and req.tool_choice != "none"
    check_prompt_chars(state, sum(len(m.text()) for m in req.messages), "messages")
    prompt_text = render_messages(state.tokenizer, req.messages, req.tools if parse_tools else None,
                                  kwargs, trust_request_template=state.trust_request_chat_template,
                                  max_chars=state.max_prompt_chars)
    check_prompt_chars(state, len(prompt_text), "messages")
    prompt_ids = list(state.tokenizer(prompt_text, add_special_tokens=False).input_ids)
    limit_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    max_tokens = resolve_max_tokens(state, len(prompt_ids), req.limit(), limit_name)
    assert state.grammar is not None
    grammar: str | None = None
    named = req.tool_choice if isinstance(req.tool_choice, NamedToolChoice) else None
    if parse_tools and (req.tool_choice == "required" or named is not None):
        only = named.function["name"] if named is not None else None
        assert req.tools is not None
        grammar = state.grammar.for_tools(req.tools, only, req.parallel_tool_calls,
                                          template_tool_format(state.tokenizer, kwargs))
    elif req.response_format is not None:
        grammar = state.grammar.for_response_format(req.response_format)
    processors = [state.grammar.processor(grammar)] if grammar else []
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(state, req, max_tokens, logprobs, processors=processors)
    run = Run(state, [Sub(new_id("chatcmpl"), prompt_ids, params)])
    thinking = kwargs.get("enable_thinking", True) is not False
    starts_thinking = thinking and prompt_opens_thinking(prompt_text)
    tool_format = template_tool_format(state.tokenizer, kwargs)
    properties = {t.function.name: dict((t.function.parameters or {}).get("properties") or {})
                  for t in req.tools or []}

    def parser() -> OutputParser:
        return OutputParser(parse_tools, thinking and req.reasoning_effort != "none",
                            starts_thinking, tool_format, properties)

    return run, parser


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, request: Request,
                                 header_id: str) -> Any:
    run, parser = await asyncio.to_thread(prepare, state, req)
    choices = [Choice(parser()) for _ in range(req.n)]
    request_id = run.subs[0].request_id
    headers = {"X-Request-Id": header_id}
    meta = {"id": request_id, "created": int(time.time()), "model": state.model_name,
            "system_fingerprint": None}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        await run.start()
        def events() -> AsyncIterator[str]:
            return _stream(state, req, run, choices, meta, include_usage)

        return AbortingStream(sse_stream(run, events), run, headers)
    try:
        await run.start()
        await _collect(state, req, run, choices)
    finally:
        run.close()
    out_choices = []
    for i, c in enumerate(choices):
        calls = c.parser.final_calls()
        msg: dict[str, Any] = {"role": "assistant",
                               "content": c.parser.content or (None if calls else ""),
                               "reasoning_content": c.parser.reasoning or None}
        if calls:
            msg["tool_calls"] = calls
        out_choices.append({"index": i, "message": msg,
                            "logprobs": {"content": c.logprobs} if req.logprobs else None,
                            "finish_reason": _finish(c, calls), "stop_reason": c.stop_reason})
    body = {**meta, "object": "chat.completion", "choices": out_choices,
            "usage": run.usage(sum(c.tokens for c in choices),
                               sum(c.reasoning_tokens for c in choices))}
    return JSONResponse(body, headers=headers)


def _finish(c: Choice, calls: list[Any]) -> str | None:
    return "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason


async def _collect(state: ServerState, req: ChatCompletionRequest, run: Run,
                   choices: list[Choice]) -> None:
    texts = [""] * len(choices)
    async for _, ev in run.events_iter():
        c = choices[ev.index]
        texts[ev.index] += ev.new_text
        c.tokens += len(ev.new_token_ids)
        if req.logprobs:
            c.logprobs += _logprob_entries(state, ev, req.top_logprobs or 0)
        if ev.finished:
            c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
            before = len(c.parser.reasoning)
            c.parser.feed(texts[ev.index], final=True)
            # Token counts of the reasoning part: re-tokenized, the engine only counts all tokens.
            if len(c.parser.reasoning) > before:
                ids = await asyncio.to_thread(
                    lambda text: state.tokenizer(text, add_special_tokens=False).input_ids,
                    c.parser.reasoning)
                c.reasoning_tokens = len(ids)


async def _stream(state: ServerState, req: ChatCompletionRequest, run: Run, choices: list[Choice],
                  meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    head = {**meta, "object": "chat.completion.chunk"}
    for i in range(len(choices)):
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    async for _, ev in run.events_iter():
        c = choices[ev.index]
        c.tokens += len(ev.new_token_ids)
        d = c.parser.feed(ev.new_text, final=ev.finished)
        if c.parser.in_reasoning or d.reasoning:
            c.reasoning_tokens += len(ev.new_token_ids)
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = [_tool_delta(*t) for t in d.tool_calls]
        lp = None
        if req.logprobs:
            lp = {"content": _logprob_entries(state, ev, req.top_logprobs or 0)}
        if delta or lp:
            yield sse({**head, "choices": [{"index": ev.index, "delta": delta, "logprobs": lp,
                                            "finish_reason": None}]})
        if ev.finished:
            c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
            yield sse({**head, "choices": [{"index": ev.index, "delta": {}, "logprobs": None,
                                            "finish_reason": _finish(c, c.parser.calls),
                                            "stop_reason": c.stop_reason}]})
    if include_usage:
        usage = run.usage(sum(c.tokens for c in choices), sum(c.reasoning_tokens for c in choices))
        yield sse({**head, "choices": [], "usage": usage})


def _tool_delta(index: int, call_id: str | None, name: str | None, args: str) -> dict[str, Any]:
    if call_id is not None:
        return {"index": index, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": args}}
    return {"index": index, "function": {"arguments": args}}


def check_tools_supported(req: ChatCompletionRequest) -> None:
    if req.response_format is not None and req.response_format.type != "text" and req.tools \
            and req.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "response_format cannot be combined with a forced tool_choice",
                       param="response_format")
