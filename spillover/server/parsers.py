"""Model output -> reasoning, content and tool calls: the `<think>` parser and the tool-call
parsers (hermes JSON, Qwen3-Coder XML), as one incremental state machine.

The parser is used for streaming and non-streaming alike (non-streaming feeds the whole text at
once), so the two modes cannot disagree about where content, reasoning and calls are: on every
prefix of the output, any chunking gives the same answer. A tool call is sent only once it is
complete, so a call cut by max_tokens comes back as text, never as half-streamed arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from spillover.server import qwen3_xml

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# hermes: `{"name": ..., "arguments": {...}}` inside the tags (Qwen2.5, Qwen3 up to 2507);
# qwen3_xml: `<function=NAME><parameter=ARG>VALUE</parameter></function>` (Qwen3-Coder).
ToolFormat = Literal["hermes", "qwen3_xml"]


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Qwen3.5-style templates end the prompt with an open `<think>`: the output
    starts inside it."""
    tail = prompt_text[-200:]
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


@dataclass
class CallState:
    id: str
    raw: str = ""  # text between <tool_call> and </tool_call> so far
    name: str | None = None
    args_sent: str = ""
    closed: bool = False


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    # (call index, id or None, name or None, argument text piece)
    tool_calls: list[tuple[int, str | None, str | None, str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.content or self.reasoning or self.tool_calls)


def _partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:k]):
                best = max(best, k)
                break
    return best


class OutputParser:
    """Splits model output into reasoning, content and tool calls, incrementally.

    `tool_properties` maps each tool's name to its JSON schema `properties`: XML parameter values
    are text, typed by these (hermes arguments are JSON already)."""

    def __init__(self, parse_tools: bool, parse_reasoning: bool,
                 starts_in_reasoning: bool = False, tool_format: ToolFormat = "hermes",
                 tool_properties: dict[str, dict[str, Any]] | None = None) -> None:
        self.parse_tools = parse_tools
        self.tool_format = tool_format
        self.tool_properties = tool_properties or {}
        self.parse_reasoning = parse_reasoning
        self.in_reasoning = parse_reasoning and starts_in_reasoning
        # may still see a leading <think>
        self._at_start = parse_reasoning and not starts_in_reasoning
        self._buf = ""
        self.calls: list[CallState] = []
        self._in_call = False
        self.content = ""
        self.reasoning = ""
        self._strip_lead = False  # blank lines right after </think> are formatting, not content
        self._pending_ws = ""  # trailing whitespace after a call, until content follows it

    def feed(self, text: str, final: bool = False) -> Delta:
        self._buf += text
        d = Delta()
        while self._buf:
            if not self._step(d, final):
                break
        if final:
            self._finish(d)
        self.content += d.content
        self.reasoning += d.reasoning
        return d

    def _step(self, d: Delta, final: bool) -> bool:
        """Consumes what it can from the buffer; False when it must wait for more text."""
        buf = self._buf
        if self._at_start:
            stripped = buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._buf = stripped[len(THINK_OPEN):]
                self._at_start, self.in_reasoning = False, True
                return True
            if THINK_OPEN.startswith(stripped) and not final:
                return False
            self._at_start = False
        if self._in_call:
            return self._step_call(d, final)
        ends = (((THINK_CLOSE,) if self.in_reasoning else ())
                + ((TOOL_OPEN,) if self.parse_tools else ()))
        hits = [(buf.find(t), t) for t in ends if t in buf]
        if hits:
            pos, tag = min(hits)
            self._emit(d, buf[:pos])
            self._buf = buf[pos + len(tag):]
            if tag == THINK_CLOSE:
                self.in_reasoning = False
                self._strip_lead = True
            else:  # <tool_call> also ends reasoning the model forgot to close
                self.in_reasoning = False
                self._pending_ws = ""
                self._in_call = True
                self.calls.append(CallState(id=f"call_{uuid.uuid4().hex[:24]}"))
            return True
        keep = 0 if final else _partial_tag_len(buf, ends)
        self._emit(d, buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _emit(self, d: Delta, text: str) -> None:
        if not text:
            return
        if self.in_reasoning:
            d.reasoning += text
            return
        if self._strip_lead:
            text = text.lstrip()
            self._strip_lead = not text
        if self.calls:
            # Whitespace after a call is not content unless more content follows it; held back
            # here so that the answer does not depend on how the text was chunked.
            text = self._pending_ws + text
            kept = text.rstrip()
            self._pending_ws = text[len(kept):]
            text = kept
        if text:
            d.content += text

    def _step_call(self, d: Delta, final: bool) -> bool:
        call = self.calls[-1]
        if self.tool_format == "qwen3_xml":
            return self._step_xml_call(d, call, final)
        pos = self._buf.find(TOOL_CLOSE)
        if pos >= 0:
            call.raw += self._buf[:pos]
            self._buf = self._buf[pos + len(TOOL_CLOSE):]
            self._close_call(d, call, saw_close=True)
            return True
        # Nothing of a call goes out before it is complete: a call cut short (max_tokens) must
        # come back as text, which it could not once a name or half the arguments had streamed.
        keep = 0 if final else _partial_tag_len(self._buf, (TOOL_CLOSE,))
        call.raw += self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _step_xml_call(self, d: Delta, call: CallState, final: bool) -> bool:
        # A literal `</tool_call>` may sit inside a value, so the end is found by walking the
        # whole call (qwen3_xml.call_end) rather than by the first closing tag.
        body = call.raw + self._buf
        end = qwen3_xml.call_end(body, final)
        if end is None:
            call.raw, self._buf = body, ""
            return False
        raw_end, resume, saw_close = end
        call.raw, self._buf = body[:raw_end], body[resume:]
        self._close_call(d, call, saw_close)
        return True

    def _index(self, call: CallState) -> int:
        return self.calls.index(call)

    def _parse_call(self, raw: str) -> tuple[str, str] | None:
        """(name, arguments as JSON text) of a call's raw text; None when it is not a call."""
        if self.tool_format == "qwen3_xml" and not raw.lstrip().startswith("{"):
            # (a hermes JSON body is still read as one: the text is unambiguous either way)
            parsed = qwen3_xml.parse_call(raw, self.tool_properties)
            if parsed is None:
                return None
            return parsed[0], json.dumps(parsed[1], ensure_ascii=False)
        try:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                # the model often stops before the outer brace
                obj = json.loads(raw.rstrip() + "}")
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
            if isinstance(args, str):
                json.loads(args)  # arguments given as a string must still be JSON
            elif not isinstance(args, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
        return name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)

    def _close_call(self, d: Delta, call: CallState, saw_close: bool) -> None:
        self._in_call = False
        call.closed = True
        parsed = self._parse_call(call.raw)
        if parsed is None:
            # Not a call after all (or one cut short): the text goes back as content, as the
            # hermes parsers do, with no closing tag the model never wrote.
            self.calls.remove(call)
            self._emit(d, TOOL_OPEN + call.raw + (TOOL_CLOSE if saw_close else ""))
            return
        name, final_args = parsed
        call.name, call.args_sent = name, final_args
        index = self._index(call)
        d.tool_calls.append((index, call.id, name, ""))
        d.tool_calls.append((index, None, None, final_args))

    def _finish(self, d: Delta) -> None:
        if self._in_call and self.calls:  # an unclosed final block, as `<tool_call>(.*)` catches it
            self._close_call(d, self.calls[-1], saw_close=False)
        self._pending_ws = ""

    def final_calls(self) -> list[dict[str, Any]]:
        """Tool calls in OpenAI's non-streaming shape (arguments as a JSON string)."""
        out = []
        for c in self.calls:
            if not c.closed or c.name is None:
                continue
            try:
                args = "{}"
                if c.args_sent:
                    args = json.dumps(json.loads(c.args_sent), ensure_ascii=False)
            except json.JSONDecodeError:
                args = c.args_sent
            out.append({"id": c.id, "type": "function",
                        "function": {"name": c.name, "arguments": args}})
        return out
