"""Protocol paths that need exact model output (tool calls, reasoning), readiness, auth and the
full queue, driven through a real HTTP server whose engine is the scripted stub."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from spillover.server.api import create_app
from spillover.server.serving import ServerState
from spillover.weights.resolve import load_tokenizer, resolve_model
from tests.server.conftest import Served, ThreadServer
from tests.server.stub_engine import ScriptedEngine

MODEL = "stub"
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
        '</tool_call>')
CALL2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[Served, ScriptedEngine, ServerState, threading.Event]]:
    engine = ScriptedEngine(load_tokenizer(resolve_model(None)), max_queue_len=2)
    release = threading.Event()

    def loader() -> ScriptedEngine:
        release.wait(30)  # lets the test see 503 while "loading"
        return engine

    state = ServerState(model_name=MODEL)
    with ThreadServer(create_app(state, loader)) as base:
        yield Served(base, MODEL), engine, state, release


@pytest.fixture(scope="module")
def served(stub: Any) -> Served:
    s, _, _, release = stub
    r = httpx.get(f"{s.base}/health")
    assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
    r = httpx.post(f"{s.base}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and "retry-after" in r.headers
    release.set()
    from tests.server.conftest import wait_healthy

    wait_healthy(s.base, 20)
    return s


def chat(served: Served, script: str, **kw: Any) -> Any:
    return served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"SCRIPT:{script}"}], max_tokens=200,
        **kw)


def stream_chat(served: Served, script: str, **kw: Any) -> list[Any]:
    return list(served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"SCRIPT:{script}"}], max_tokens=200,
        stream=True, **kw))


def test_tool_call_non_streaming(served: Served) -> None:
    r = chat(served, f"Let me check. {CALL}", tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content == "Let me check. "
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str)
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": [1, 2]}


def test_parallel_tool_calls_streaming(served: Served) -> None:
    chunks = stream_chat(served, f"{CALL}\n{CALL2}", tools=TOOLS, tool_choice="auto")
    assert chunks[0].choices[0].delta.role == "assistant"
    calls: dict[int, dict[str, Any]] = {}
    content = ""
    finishes = []
    for ch in chunks:
        for choice in ch.choices:
            content += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
                if tc.id:
                    assert slot["id"] is None, "id is sent once, on the first fragment"
                    slot["id"], slot["name"] = tc.id, tc.function.name
                slot["args"] += tc.function.arguments or ""
    assert finishes == ["tool_calls"]
    assert "<tool_call>" not in content and content.strip() == ""
    assert sorted(calls) == [0, 1]
    assert calls[0]["name"] == calls[1]["name"] == "get_weather"
    assert json.loads(calls[0]["args"]) == {"city": "Paris", "days": [1, 2]}
    assert json.loads(calls[1]["args"]) == {"city": "Rome"}


def test_tool_choice_none_keeps_text(served: Served) -> None:
    r = chat(served, CALL, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert "<tool_call>" in (r.choices[0].message.content or "")


def test_tool_call_back_in_history(served: Served) -> None:
    msgs: list[Any] = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user",
         "content": [{"type": "text", "text": "SCRIPT:"}, {"type": "text", "text": "Sunny."}]},
    ]
    r = served.client().chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS,
                                                max_tokens=20)
    assert r.choices[0].message.content == "Sunny."


REASONED = "<think>\nThe user wants a greeting.\n</think>\n\nHi there!"


def test_reasoning_split(served: Served) -> None:
    m = chat(served, REASONED).choices[0].message
    assert m.content == "Hi there!"
    assert m.reasoning_content.strip() == "The user wants a greeting."  # type: ignore[attr-defined]
    chunks = stream_chat(served, REASONED, stream_options={"include_usage": True})
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks
                        if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Hi there!" and reasoning.strip() == "The user wants a greeting."
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


def test_reasoning_then_tool_call_streaming(served: Served) -> None:
    chunks = stream_chat(served, f"<think>need weather</think>{CALL}", tools=TOOLS)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks
                        if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                   for tc in c.choices[0].delta.tool_calls or [])
    assert reasoning == "need weather" and content == ""
    assert json.loads(args)["city"] == "Paris"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_thinking_disabled_is_content(served: Served) -> None:
    m = chat(served, "<think>x</think>y",
             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert m.choices[0].message.content == "<think>x</think>y"


def test_api_key(stub: Any, served: Served) -> None:
    _, _, state, _ = stub
    state.api_key = "sekrit"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            served.client(api_key="wrong").models.list()
        assert e.value.status_code == 401
        assert served.client(api_key="sekrit").models.list().data[0].id == MODEL
        assert httpx.get(f"{served.base}/health").status_code == 200  # no key needed
    finally:
        state.api_key = None


def test_queue_full_is_429_with_retry_after(stub: Any, served: Served) -> None:
    _, engine, _, _ = stub
    engine.gate.clear()  # the engine stalls: requests pile up in its queue
    body = {"model": MODEL, "messages": [{"role": "user", "content": "SCRIPT:a"}], "stream": True}
    try:
        with httpx.Client(base_url=served.base, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as s1, \
                    c.stream("POST", "/v1/chat/completions", json=body) as s2:
                assert s1.status_code == s2.status_code == 200
                r = httpx.post(f"{served.base}/v1/chat/completions", json=body)
                assert r.status_code == 429
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
                engine.gate.set()
                assert "[DONE]" in s1.read().decode() and "[DONE]" in s2.read().decode()
    finally:
        engine.gate.set()
    assert chat(served, "ok").choices[0].message.content == "ok"
