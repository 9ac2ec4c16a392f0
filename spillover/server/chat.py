"""Chat templates, and the Qwen/hermes tool-call and `<think>` reasoning parsers.

The parser is one state machine used for streaming and non-streaming alike (non-streaming feeds the
whole text at once), so the two modes cannot disagree about where content, reasoning and calls are:
on every prefix of the output, any chunking gives the same answer. A tool call is sent only once it
is complete, so a call cut by max_tokens comes back as text, never as half-streamed arguments.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
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


# A request-supplied template is untrusted code: it runs sandboxed, with its output, its
# loops' length and its time bounded (a 126-byte template rendering a million repeats froze
# the event loop for seconds).
TEMPLATE_TIMEOUT_S = 5.0
DEFAULT_TEMPLATE_MAX_CHARS = 4 * 1024 * 1024


class TemplateLimit(Exception):
    pass


def _bounded_env(max_chars: int, deadline: float, timeout_s: float) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    def check_time() -> None:
        if time.monotonic() > deadline:
            raise TemplateLimit(f"rendering took longer than {timeout_s:g} s")

    def check_size(v: Any) -> Any:
        if isinstance(v, (str, list, tuple, dict)) and len(v) > max_chars:
            raise TemplateLimit(f"a value grew past {max_chars} characters")
        return v

    class Env(ImmutableSandboxedEnvironment):  # type: ignore[misc]
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            check_time()
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise TemplateLimit("exponent too large")
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if isinstance(a, (str, list, tuple)) and isinstance(b, int) \
                            and len(a) * b > max_chars:
                        raise TemplateLimit(f"a value grew past {max_chars} characters")
            return check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            check_time()
            return check_size(super().call(__context, __obj, *args, **kwargs))

    def bounded_range(*args: int) -> Any:
        for i in safe_range(*args):
            check_time()
            yield i

    def bounded_filter(f: Any) -> Any:
        def g(*args: Any, **kwargs: Any) -> Any:
            check_time()
            if any(isinstance(a, int) and a > max_chars for a in (*args, *kwargs.values())):
                raise TemplateLimit("a filter argument is too large")
            return check_size(f(*args, **kwargs))

        for attr in ("jinja_pass_arg",):
            if hasattr(f, attr):
                setattr(g, attr, getattr(f, attr))
        return g

    def raise_exception(message: str) -> None:
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {k: bounded_filter(f) for k, f in env.filters.items()}
    env.globals.update(range=bounded_range, raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def render_untrusted_template(source: str, context: dict[str, Any], max_chars: int,
                              timeout_s: float = TEMPLATE_TIMEOUT_S) -> str:
    """Renders `source` sandboxed, stopping once the output passes `max_chars` characters or the
    time `timeout_s` (checked at every output chunk, call, operator and loop step)."""
    deadline = time.monotonic() + timeout_s
    env = _bounded_env(max_chars, deadline, timeout_s)
    try:
        template = env.from_string(source)
        parts: list[str] = []
        size = 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > max_chars:
                raise TemplateLimit(f"the rendered prompt passed {max_chars} characters")
            if time.monotonic() > deadline:
                raise TemplateLimit(f"rendering took longer than {timeout_s:g} s")
            parts.append(piece)
    except TemplateLimit as e:
        raise APIError(400, f"chat template error: {e}", param="chat_template_kwargs",
                       code="invalid_chat_template") from None
    except (RecursionError, MemoryError, OverflowError):
        raise APIError(400, "chat template error: the template is too expensive to render",
                       param="chat_template_kwargs", code="invalid_chat_template") from None
    return "".join(parts)


def render_messages(tokenizer: Any, messages: list[ChatMessage], tools: list[ToolDef] | None,
                    kwargs: dict[str, Any], add_generation_prompt: bool = True,
                    trust_request_template: bool = False,
                    max_chars: int = DEFAULT_TEMPLATE_MAX_CHARS) -> str:
    """Applies the model's chat template; templates that know no tools get hermes-style text.

    A template in `kwargs["chat_template"]` (the request's `chat_template_kwargs`) is refused
    with a 400 unless the server trusts request templates; trusted, it renders bounded."""
    request_template = kwargs.get("chat_template")
    if request_template is not None and not trust_request_template:
        raise APIError(400, "request-supplied chat templates are disabled on this server (start "
                            "it with --trust-request-chat-template to allow them)",
                       param="chat_template_kwargs.chat_template",
                       code="chat_template_not_allowed")
    if request_template is not None and not isinstance(request_template, str):
        raise APIError(400, "chat_template must be a string",
                       param="chat_template_kwargs.chat_template", code="invalid_value")
    source = request_template if request_template is not None else _template_source(tokenizer)
    native_tools = "tools" in source
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
    if request_template is not None:
        kw.pop("chat_template")
        special = dict(getattr(tokenizer, "special_tokens_map", None) or {})
        context = {**special, **kw, "messages": out, "add_generation_prompt": add_generation_prompt}
        try:
            return render_untrusted_template(request_template, context, max_chars)
        except APIError:
            raise
        except Exception as e:  # jinja syntax/type errors: the client's template
            raise APIError(400, f"chat template error: {e}"[:500], param="chat_template_kwargs",
                           code="invalid_chat_template") from None
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

    def _index(self, call: CallState) -> int:
        return self.calls.index(call)

    def _close_call(self, d: Delta, call: CallState, saw_close: bool) -> None:
        self._in_call = False
        call.closed = True
        try:
            try:
                obj = json.loads(call.raw)
            except json.JSONDecodeError:
                # the model often stops before the outer brace
                obj = json.loads(call.raw.rstrip() + "}")
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
            if isinstance(args, str):
                json.loads(args)  # arguments given as a string must still be JSON
            elif not isinstance(args, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            # Not a call after all (or one cut short): the text goes back as content, as the
            # hermes parsers do, with no closing tag the model never wrote.
            self.calls.remove(call)
            self._emit(d, TOOL_OPEN + call.raw + (TOOL_CLOSE if saw_close else ""))
            return
        final_args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
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
