"""Qwen3-Coder XML tool calls through the HTTP server (stub engine, a Qwen3-Coder-shaped template),
driven by the official openai client: streaming and non-streaming give the same typed calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from spillover.server.api import create_app
from spillover.server.serving import ServerState
from spillover.weights.resolve import load_tokenizer, resolve_model
from tests.server.conftest import Served, ThreadServer, wait_healthy
from tests.server.qwen3_coder_template import QWEN3_CODER_TEMPLATE
from tests.server.stub_engine import ScriptedEngine

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}},
        "required": ["city"]}}}]
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan José\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nfalse\n</parameter>\n"
        "</function>\n</tool_call>")
EXPECTED = {"city": "San José", "days": 3, "metric": False}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    tok = load_tokenizer(resolve_model(None))
    tok.chat_template = QWEN3_CODER_TEMPLATE
    engine = ScriptedEngine(tok)
    with ThreadServer(create_app(ServerState(model_name="stub"), lambda: engine)) as base:
        wait_healthy(base, 20)
        yield Served(base, "stub")


def ask(served: Served, script: str, **kw: Any) -> Any:
    return served.client().chat.completions.create(
        model="stub", messages=[{"role": "system", "content": "You help."},
                                {"role": "user", "content": f"SCRIPT:{script}"}],
        max_tokens=200, tools=TOOLS, **kw)


def test_xml_call_non_streaming(served: Served) -> None:
    c = ask(served, f"Checking.\n{CALL}").choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content == "Checking.\n"
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == EXPECTED


def test_xml_call_streaming_agrees(served: Served) -> None:
    chunks = list(ask(served, f"Checking.\n{CALL}\n{CALL}", stream=True))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls: dict[int, list[Any]] = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            slot = calls.setdefault(tc.index, [None, ""])
            if tc.id:
                slot[0] = tc.function.name
            slot[1] += tc.function.arguments or ""
    assert content == "Checking.\n"
    assert [(n, json.loads(a)) for n, a in calls.values()] == [("get_weather", EXPECTED)] * 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "<function=" not in content


def test_xml_text_without_tools_is_content(served: Served) -> None:
    r = served.client().chat.completions.create(
        model="stub", messages=[{"role": "user", "content": f"SCRIPT:{CALL}"}], max_tokens=200)
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls
