"""Forced tool_choice for Qwen3-Coder templates: the grammar admits exactly XML calls to the
declared tools, typed by their schemas, and what it admits parses back to those arguments."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import llguidance
import pytest

from spillover.server.grammar import GrammarCompiler
from spillover.server.parsers import OutputParser
from spillover.server.protocol import ToolDef
from spillover.weights.resolve import load_tokenizer, resolve_model

TOOLS = [ToolDef.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer"}}}}}}),
    ToolDef.model_validate({"type": "function", "function": {"name": "ping"}})]
PROPS = {t.function.name: (t.function.parameters or {}).get("properties", {}) for t in TOOLS}


@lru_cache(maxsize=1)
def compiler() -> tuple[Any, GrammarCompiler]:
    tok = load_tokenizer(resolve_model(None))
    return tok, GrammarCompiler(tok, len(tok), [int(tok.eos_token_id)])


def accepts(text: str, only: str | None = None, parallel: bool = True) -> bool:
    tok, gc = compiler()
    m = llguidance.LLMatcher(gc.lltok, gc.for_tools(TOOLS, only, parallel, "qwen3_xml"),
                             log_level=0)
    for t in tok(text, add_special_tokens=False).input_ids:
        if not m.consume_token(t):
            return False
    return bool(m.is_accepting())


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


GOOD = call("get_weather", city="San </param> José <b>", days="3", metric="false",
            hours="[9, 12]")


def test_admits_typed_xml_calls_that_parse_back() -> None:
    assert accepts(GOOD)
    assert accepts(call("ping"))
    assert accepts(GOOD + "\n" + call("ping"))
    p = OutputParser(True, False, tool_format="qwen3_xml", tool_properties=PROPS)
    p.feed(GOOD, final=True)
    (c,) = p.final_calls()
    assert json.loads(c["function"]["arguments"]) == {
        "city": "San </param> José <b>", "days": 3, "metric": False, "hours": [9, 12]}


@pytest.mark.parametrize("text, only, parallel", [
    (call("get_weather", days="3"), None, True),  # the required city is missing
    (call("get_weather", city="x", days="three"), None, True),
    (call("get_weather", city="x", metric="yes"), None, True),
    (call("get_weather", city="x", hours="[9, \"noon\"]"), None, True),
    (call("get_weather", city="a </parameter> b"), None, True),
    (call("nope"), None, True),
    ('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', None, True),
    (call("ping"), "get_weather", True),
    (call("ping") + "\n" + call("ping"), None, False),
])
def test_refuses_everything_else(text: str, only: str | None, parallel: bool) -> None:
    assert not accepts(text, only, parallel)
