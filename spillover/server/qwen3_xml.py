"""Qwen3-Coder's XML tool calls: where a call ends, and its parameters typed by the tool's schema.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Values are raw text (code, paths, regexes: nothing to escape, the reason for the format), so a
literal `</parameter>` or `</tool_call>` may sit inside one. A tag counts as structure only when the
next tag follows it: `</parameter>` must be followed, after whitespace, by `<parameter=`,
`</function>` or `</tool_call>`. Every verdict here depends only on text already seen and never
changes as more text arrives, which is what lets streaming and non-streaming agree.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any, Literal

TOOL_CLOSE = "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"
_NEXT_TAGS = (PARAM_OPEN, FUNC_CLOSE, TOOL_CLOSE)
_LONGEST_TAG = max(len(t) for t in _NEXT_TAGS)
# A function name is an identifier (dots, dashes and slashes allowed); these would mean the model
# wrote a template placeholder or prose (`<function={{ name }}>`), not a call.
_NAME_FORBIDDEN = frozenset("{}<>\"' \t\r\n")


@dataclass
class Walk:
    """The verdict on a call's body (the text after `<tool_call>`) as far as it has arrived."""

    status: Literal["wait", "bad", "done"]
    end: int = 0  # done: just past `</function>` (or where `</tool_call>` starts, if it is missing)
    name: str = ""
    params: list[tuple[str, str]] = field(default_factory=list)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _could_become(text: str, i: int, tags: tuple[str, ...]) -> bool:
    """True when the rest of `text` from `i` is a proper prefix of one of `tags` (maybe empty)."""
    if len(text) - i >= _LONGEST_TAG:
        return False
    rest = text[i:]
    return any(t.startswith(rest) and t != rest for t in tags)


def _param_end(body: str, start: int) -> int | None:
    """Index of the `</parameter>` closing the value that starts at `start`; None: not yet known."""
    pos = start
    while True:
        k = body.find(PARAM_CLOSE, pos)
        if k < 0:
            return None
        j = _skip_ws(body, k + len(PARAM_CLOSE))
        if body.startswith(_NEXT_TAGS, j):
            return k
        if _could_become(body, j, _NEXT_TAGS):
            return None
        pos = k + 1  # a literal `</parameter>` inside the value


def walk(body: str) -> Walk:
    i = _skip_ws(body, 0)
    if not body.startswith(FUNC_OPEN, i):
        return Walk("wait" if _could_become(body, i, (FUNC_OPEN,)) else "bad")
    i += len(FUNC_OPEN)
    gt = body.find(">", i)
    name = body[i:] if gt < 0 else body[i:gt]
    if any(c in _NAME_FORBIDDEN for c in name) or (gt >= 0 and not name):
        return Walk("bad")
    if gt < 0:
        return Walk("wait")
    out = Walk("wait", name=name)
    i = gt + 1
    while True:
        i = _skip_ws(body, i)
        if body.startswith(FUNC_CLOSE, i):
            out.status, out.end = "done", i + len(FUNC_CLOSE)
            return out
        if body.startswith(TOOL_CLOSE, i):  # the model forgot `</function>`
            out.status, out.end = "done", i
            return out
        if not body.startswith(PARAM_OPEN, i):
            return Walk("wait" if _could_become(body, i, _NEXT_TAGS) else "bad")
        i += len(PARAM_OPEN)
        gt = body.find(">", i)
        pname = body[i:] if gt < 0 else body[i:gt]
        if "\n" in pname or "<" in pname or (gt >= 0 and not pname):
            return Walk("bad")
        if gt < 0:
            return Walk("wait")
        end = _param_end(body, gt + 1)
        if end is None:
            return Walk("wait")
        value = body[gt + 1:end]
        # The format puts each value on its own lines: one newline either side is layout.
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        out.params.append((pname, value))
        i = end + len(PARAM_CLOSE)


def call_end(body: str, final: bool) -> tuple[int, int, bool] | None:
    """Where the XML call in `body` ends: (end of the call's raw text, where the text after it
    resumes, whether `</tool_call>` closed it), or None while that is not yet known. A body that
    is not this structure (hermes JSON, or junk) ends at the first `</tool_call>`, as in hermes."""
    w = walk(body)
    if w.status == "bad":
        pos = body.find(TOOL_CLOSE)
        if pos >= 0:
            return pos, pos + len(TOOL_CLOSE), True
        return (len(body), len(body), False) if final else None
    if w.status == "wait":
        # cut short: the caller gets the raw text back, which will not parse as a call
        return (len(body), len(body), False) if final else None
    j = _skip_ws(body, w.end)
    if body.startswith(TOOL_CLOSE, j):
        return j, j + len(TOOL_CLOSE), True
    if not final and (j == len(body) or _could_become(body, j, (TOOL_CLOSE,))):
        return None
    # A complete function with no `</tool_call>` after it (the model stopped, or went on
    # writing): still a call; what follows is content.
    return w.end, w.end, False


def parse_call(raw: str, tool_properties: dict[str, dict[str, Any]]
               ) -> tuple[str, dict[str, Any]] | None:
    """(name, typed arguments) of a complete XML call body; None when it is not one.
    `tool_properties`: each tool's name -> its JSON schema `properties`."""
    w = walk(raw)
    if w.status != "done" or raw[_skip_ws(raw, w.end):]:
        return None
    properties = tool_properties.get(w.name)
    args: dict[str, Any] = {}
    for pname, value in w.params:
        args[pname] = convert_value(value, (properties or {}).get(pname))
    return w.name, args


_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")


def _schema_type(schema: Any) -> tuple[str, bool]:
    """The (first non-null) JSON-schema type of a parameter, and whether null is allowed."""
    if not isinstance(schema, dict):
        return "string", False
    t = schema.get("type")
    if isinstance(t, list):
        names = [str(x).lower() for x in t]
        non_null = [x for x in names if x != "null"]
        return (non_null[0] if non_null else "null"), "null" in names
    if t is not None:
        name = str(t).strip().lower()
        return name, name == "null"
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            names = [str(o.get("type", "")).lower() for o in options if isinstance(o, dict)]
            non_null = [x for x in names if x and x != "null"]
            return (non_null[0] if non_null else "string"), "null" in names
    return ("object" if "properties" in schema else "string"), False


def convert_value(value: str, schema: Any) -> Any:
    """Raw parameter text -> the JSON value its schema asks for, as the reference parser converts
    it; text that does not convert stays a string (the client sees what the model wrote)."""
    if schema is None:  # a parameter the tool does not declare
        return value
    kind, nullable = _schema_type(schema)
    if value.strip().lower() in ("null", "none") and (nullable or kind not in _STRING_TYPES):
        return None
    if kind in _STRING_TYPES:
        return value
    text = value.strip()
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(text)
        except ValueError:
            return value
    if kind.startswith(("num", "float", "double")):
        try:
            f = float(text)
        except ValueError:
            return value
        return int(f) if f.is_integer() and "." not in text and "e" not in text.lower() else f
    if kind in ("boolean", "bool", "binary"):
        low = text.lower()
        return {"true": True, "false": False}.get(low, value)
    # object, array and anything else: JSON first, then a Python literal (models trained on
    # templates that printed Python reprs write `{'k': 'v'}` and `True`).
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        obj = ast.literal_eval(text)
        json.dumps(obj)  # sets, bytes, complex numbers: not JSON, so not an argument
        return obj
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
