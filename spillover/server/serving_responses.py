"""POST /v1/responses: the Responses API on top of the chat machinery.

One `OutputItems` turns the output parser's deltas into output items (reasoning, message,
function calls) and their stream events. Streaming and non-streaming both feed it every engine
event in order, so the two give the same items.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from spillover.server.bridge import EngineDead
from spillover.server.parsers import Delta, OutputParser
from spillover.server.protocol import APIError
from spillover.server.protocol_responses import NamedFunction, ResponsesRequest, to_chat_request
from spillover.server.serving import AbortingStream, Run, ServerState
from spillover.server.serving_chat import prepare


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"  # OpenAI's spelling: resp_..., msg_..., fc_...


class OutputItems:
    """The response's `output` as it grows, and the events that describe each step of it."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self._reasoning: dict[str, Any] | None = None  # open items, closed by `finish`
        self._message: dict[str, Any] | None = None

    def _add(self, item: dict[str, Any], part: dict[str, Any] | None) -> list[dict[str, Any]]:
        self.output.append(item)
        ev = [{"type": "response.output_item.added", "output_index": len(self.output) - 1,
               "item": copy.deepcopy(item)}]
        if part is not None:
            item["content"].append(part)
            ev.append({"type": "response.content_part.added", "item_id": item["id"],
                       "output_index": len(self.output) - 1, "content_index": 0,
                       "part": dict(part)})
        return ev

    def _close_text(self, item: dict[str, Any] | None, status: str) -> list[dict[str, Any]]:
        if item is None:
            return []
        index = self.output.index(item)
        part = item["content"][0]
        item["status"] = status
        kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
        done: dict[str, Any] = {"type": f"response.{kind}.done", "item_id": item["id"],
                                "output_index": index, "content_index": 0, "text": part["text"]}
        if kind == "output_text":
            done["logprobs"] = []
        return [done,
                {"type": "response.content_part.done", "item_id": item["id"],
                 "output_index": index, "content_index": 0, "part": dict(part)},
                {"type": "response.output_item.done", "output_index": index, "item": item}]

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        ev: list[dict[str, Any]] = []
        if kind == "reasoning":
            if self._reasoning is None:
                self._reasoning = {"type": "reasoning", "id": _item_id("rs"), "summary": [],
                                   "content": [], "status": "in_progress"}
                ev += self._add(self._reasoning, {"type": "reasoning_text", "text": ""})
            item = self._reasoning
        else:
            if self._message is None:
                self._message = {"type": "message", "id": _item_id("msg"), "role": "assistant",
                                 "status": "in_progress", "content": []}
                ev += self._add(self._message,
                                {"type": "output_text", "text": "", "annotations": [],
                                 "logprobs": []})
            item = self._message
        item["content"][0]["text"] += text
        delta: dict[str, Any] = {
            "type": "response.reasoning_text.delta" if kind == "reasoning"
            else "response.output_text.delta",
            "item_id": item["id"], "output_index": self.output.index(item), "content_index": 0,
            "delta": text}
        if kind != "reasoning":
            delta["logprobs"] = []
        return ev + [delta]

    def feed(self, d: Delta) -> list[dict[str, Any]]:
        ev: list[dict[str, Any]] = []
        if d.reasoning:
            ev += self._text("reasoning", d.reasoning)
        if (d.content or d.tool_calls) and self._reasoning is not None \
                and self._reasoning["status"] == "in_progress":
            ev += self._close_text(self._reasoning, "completed")  # the thinking is over
        if d.content:
            ev += self._text("message", d.content)
        for _, call_id, name, args in d.tool_calls:
            if call_id is not None:  # the parser sends a call whole: its name, then arguments
                item = {"type": "function_call", "id": _item_id("fc"), "call_id": call_id,
                        "name": name, "arguments": "", "status": "in_progress"}
                ev += self._add(item, None)
                continue
            item = self.output[-1]
            index = len(self.output) - 1
            item["arguments"], item["status"] = args, "completed"
            ev += [{"type": "response.function_call_arguments.delta", "item_id": item["id"],
                    "output_index": index, "delta": args},
                   {"type": "response.function_call_arguments.done", "item_id": item["id"],
                    "output_index": index, "name": item["name"], "arguments": args},
                   {"type": "response.output_item.done", "output_index": index, "item": item}]
        return ev

    def finish(self, complete: bool) -> list[dict[str, Any]]:
        status = "completed" if complete else "incomplete"
        ev: list[dict[str, Any]] = []
        if self._reasoning is not None and self._reasoning["status"] == "in_progress":
            ev += self._close_text(self._reasoning, status)
        return ev + self._close_text(self._message, status)


class ResponseRun:
    """One /v1/responses request on the engine: the parser, the items and the response body."""

    def __init__(self, state: ServerState, req: ResponsesRequest, run: Run,
                 parser: OutputParser) -> None:
        self.state, self.req, self.run, self.parser = state, req, run, parser
        self.id = _item_id("resp")
        self.created = int(time.time())
        self.items = OutputItems()
        self.tokens = self.reasoning_tokens = 0
        self.finish_reason: str | None = None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async for _, ev in self.run.events_iter():
            self.tokens += len(ev.new_token_ids)
            d = self.parser.feed(ev.new_text, final=ev.finished)
            if self.parser.in_reasoning or d.reasoning:
                self.reasoning_tokens += len(ev.new_token_ids)
            for e in self.items.feed(d):
                yield e
            if ev.finished:
                self.finish_reason = ev.finish_reason
                for e in self.items.finish(ev.finish_reason != "length"):
                    yield e

    def body(self, status: str) -> dict[str, Any]:
        req = self.req
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": self.state.model_name,
            "output": self.items.output if status != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                          "summary": None},
            "store": False, "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                     if req.text and req.text.format else {"type": "text"}},
            "tool_choice": (req.tool_choice.model_dump()
                            if isinstance(req.tool_choice, NamedFunction)
                            else req.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": req.truncation or "disabled", "usage": None, "metadata": {}}
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        if status in ("completed", "incomplete"):
            u = self.run.usage(self.tokens, self.reasoning_tokens)
            out["usage"] = {
                "input_tokens": u["prompt_tokens"],
                "input_tokens_details": {"cached_tokens":
                                         u["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": u["total_tokens"]}
        return out

    @property
    def final_status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"


async def create_response(state: ServerState, req: ResponsesRequest, header_id: str) -> Any:
    chat_req = await asyncio.to_thread(to_chat_request, req)
    run, parser = await asyncio.to_thread(prepare, state, chat_req)
    rr = ResponseRun(state, req, run, parser())
    headers = {"X-Request-Id": header_id}
    if req.stream:
        await run.start()
        return AbortingStream(_stream(rr), run, headers)
    try:
        await run.start()
        async for _ in rr.events():
            pass
    finally:
        run.close()
    return JSONResponse(rr.body(rr.final_status), headers=headers)


def _event(obj: dict[str, Any], seq: int) -> str:
    obj["sequence_number"] = seq
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"event: {obj['type']}\ndata: {data}\n\n"


async def _stream(rr: ResponseRun) -> AsyncIterator[str]:
    """The Responses event stream (no `[DONE]`: the API ends with response.completed, or with an
    `error` event when the engine fails after the 200 went out)."""
    seq = 0
    try:
        for kind in ("created", "in_progress"):
            yield _event({"type": f"response.{kind}", "response": rr.body("in_progress")}, seq)
            seq += 1
        async for e in rr.events():
            yield _event(e, seq)
            seq += 1
        status = rr.final_status
        kind = "completed" if status == "completed" else "incomplete"
        yield _event({"type": f"response.{kind}", "response": rr.body(status)}, seq)
    except APIError as e:
        yield _event({"type": "error", "code": e.code, "message": e.message, "param": e.param},
                     seq)
    except EngineDead as e:
        yield _event({"type": "error", "code": "engine_unavailable", "message": str(e),
                      "param": None}, seq)
    finally:
        rr.run.close()
