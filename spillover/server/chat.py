"""Chat templates, and the Qwen/hermes tool-call and `<think>` reasoning parsers.

The parser is one state machine used for streaming and non-streaming alike (non-streaming feeds the
whole text at once), so the two modes cannot disagree about where content, reasoning and calls are.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from spillover.server.protocol import APIError, ChatMessage, ToolDef

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

_HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _template_source(tokenizer: Any) -> str:
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) else json.dumps(t or "")


def render_messages(tokenizer: Any, messages: list[ChatMessage], tools: list[ToolDef] | None,
                    kwargs: dict[str, Any], add_generation_prompt: bool = True) -> str:
    """Applies the model's chat template; templates that know no tools get hermes-style text."""
    native_tools = "tools" in _template_source(tokenizer)
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else ("tool" if m.role == "function" else m.role)
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _as_obj(c.function.arguments)}
                     for c in m.tool_calls]
            if native_tools:
                msg["tool_calls"] = [{"type": "function", "id": c.id, "function": f}
                                     for c, f in zip(m.tool_calls, calls, strict=True)]
            else:
                blocks = "\n".join(f"{TOOL_OPEN}\n{json.dumps(f)}\n{TOOL_CLOSE}" for f in calls)
                msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + blocks
        if role == "tool":
            if native_tools:
                msg["tool_call_id"] = m.tool_call_id
            else:
                msg = {"role": "user",
                       "content": f"<tool_response>\n{msg['content']}\n</tool_response>"}
        out.append(msg)
    if tool_dicts and not native_tools:
        block = _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tool_dicts))
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + block
        else:
            out.insert(0, {"role": "system", "content": block})
    kw = dict(kwargs)
    if tool_dicts and native_tools:
        kw["tools"] = tool_dicts
    try:
        text = tokenizer.apply_chat_template(out, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **kw)
    except Exception as e:  # jinja errors (e.g. roles the template forbids) are the client's input
        raise APIError(400, f"chat template error: {e}"[:500], code="invalid_messages") from None
    return str(text)


def _as_obj(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        raise APIError(400, "tool_calls[].function.arguments must be a JSON string",
                       param="messages", code="invalid_value") from None


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Qwen3.5-style templates end the prompt with an open `<think>`: the output
    starts inside it."""
    tail = prompt_text[-200:]
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


# ---- output parsing -----------------------------------------------------------------------------

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


_NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS_RE = re.compile(r'"(?:arguments|parameters)"\s*:\s*')
_TRAILING_CLOSE_RE = re.compile(r"\s*\}?\s*$")


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
    """Splits model output into reasoning, content and hermes tool calls, incrementally."""

    def __init__(self, parse_tools: bool, parse_reasoning: bool,
                 starts_in_reasoning: bool = False) -> None:
        self.parse_tools = parse_tools
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
        # whitespace between calls is not content
        if text and not (self.calls and not text.strip()):
            d.content += text

    def _step_call(self, d: Delta, final: bool) -> bool:
        call = self.calls[-1]
        pos = self._buf.find(TOOL_CLOSE)
        if pos >= 0:
            call.raw += self._buf[:pos]
            self._buf = self._buf[pos + len(TOOL_CLOSE):]
            self._close_call(d, call)
            return True
        keep = 0 if final else _partial_tag_len(self._buf, (TOOL_CLOSE,))
        call.raw += self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        self._stream_call(d, call)
        return False

    def _index(self, call: CallState) -> int:
        return self.calls.index(call)

    def _stream_call(self, d: Delta, call: CallState) -> None:
        if call.name is None:
            m = _NAME_RE.search(call.raw)
            if m is None:
                return
            call.name = json.loads(f'"{m.group(1)}"')
            d.tool_calls.append((self._index(call), call.id, call.name, ""))
        m = _ARGS_RE.search(call.raw)
        if m is None or m.start() < (_NAME_RE.search(call.raw) or m).start():
            return  # arguments before the name: sent whole when the call closes
        body = call.raw[m.end():]
        # Hold back a trailing "}" and whitespace: it may be the end of the outer object.
        safe = body[: _TRAILING_CLOSE_RE.search(body).start()]  # type: ignore[union-attr]
        if safe.startswith(call.args_sent) and len(safe) > len(call.args_sent):
            d.tool_calls.append((self._index(call), None, None, safe[len(call.args_sent):]))
            call.args_sent = safe

    def _close_call(self, d: Delta, call: CallState) -> None:
        self._in_call = False
        call.closed = True
        text = call.raw
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                text = call.raw.rstrip() + "}"  # the model often stops before the outer brace
                obj = json.loads(text)
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            # Not a call after all: give the text back as content, as the hermes parsers do.
            self.calls.remove(call)
            d.content += TOOL_OPEN + call.raw + TOOL_CLOSE
            return
        final_args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        if call.name is None:
            call.name = name
            d.tool_calls.append((self._index(call), call.id, name, ""))
        m = _ARGS_RE.search(text)
        raw_args = text[m.end():] if m else ""
        raw_args = raw_args[: _TRAILING_CLOSE_RE.search(raw_args).start()]  # type: ignore[union-attr]
        if call.args_sent and raw_args.startswith(call.args_sent):
            rest = raw_args[len(call.args_sent):]
            call.args_sent = raw_args
        else:
            rest = final_args if not call.args_sent else ""
            call.args_sent += rest
        if rest:
            d.tool_calls.append((self._index(call), None, None, rest))

    def _finish(self, d: Delta) -> None:
        if self._in_call and self.calls:  # an unclosed final block, as `<tool_call>(.*)` catches it
            self._close_call(d, self.calls[-1])

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
