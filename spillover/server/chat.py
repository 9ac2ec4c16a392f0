"""Chat templates: rendering the model's (or a trusted request's) template, sandboxed and bounded,
and telling which tool-call format a template teaches (the output parsers are in parsers.py).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from spillover.server.parsers import TOOL_CLOSE, TOOL_OPEN, ToolFormat
from spillover.server.protocol import APIError, ChatMessage, ToolDef

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


def template_tool_format(tokenizer: Any, kwargs: dict[str, Any]) -> ToolFormat:
    """The tool-call format the template teaches the model: Qwen3-Coder's XML when the template
    spells out `<function=...>` / `<parameter=...>` (as llama.cpp detects it), else hermes JSON
    (also what the server itself writes into templates that know no tools)."""
    request_template = kwargs.get("chat_template")
    source = request_template if isinstance(request_template, str) else _template_source(tokenizer)
    return "qwen3_xml" if "<function=" in source and "<parameter=" in source else "hermes"


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
