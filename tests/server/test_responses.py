"""POST /v1/responses through the official openai client (stub engine: exact scripted output):
text and message-list input, instructions, function calls and their outputs, reasoning items,
streaming events that add up to the non-streaming response, and 400s for what it cannot do."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from spillover.server.api import create_app
from spillover.server.serving import ServerState
from spillover.weights.resolve import load_tokenizer, resolve_model
from tests.server.conftest import Served, ThreadServer, wait_healthy
from tests.server.stub_engine import ScriptedEngine

TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "description": "Weather",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
MIXED = f"<think>\nneed the weather\n</think>\n\nChecking now. {CALL}"


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[Served, ScriptedEngine]]:
    engine = ScriptedEngine(load_tokenizer(resolve_model(None)))
    with ThreadServer(create_app(ServerState(model_name="stub"), lambda: engine)) as base:
        wait_healthy(base, 20)
        yield Served(base, "stub"), engine


@pytest.fixture(scope="module")
def served(stub: tuple[Served, ScriptedEngine]) -> Served:
    return stub[0]


def test_text_input(served: Served) -> None:
    r = served.client().responses.create(model="stub", input="SCRIPT:Hello there.")
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.output_text == "Hello there."
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert r.usage is not None and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_instructions_and_message_list_reach_the_prompt(served: Served) -> None:
    items: list[Any] = [{"role": "user", "content": "Hi"},
                        {"type": "message", "role": "assistant",
                         "content": [{"type": "output_text", "text": "Hello!"}]},
                        {"role": "user", "content": [{"type": "input_text", "text": "SCRIPT:Ok."}]}]
    r = served.client().responses.create(model="stub", input=items, instructions="Be terse.")
    assert r.output_text == "Ok." and r.instructions == "Be terse."
    # the prompt is exactly the chat template of the equivalent chat messages
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "SCRIPT:Ok."}]
    count = httpx.post(f"{served.base}/tokenize", json={"messages": msgs}).json()["count"]
    assert r.usage is not None and r.usage.input_tokens == count


def test_function_call_then_its_output(served: Served) -> None:
    c = served.client()
    r = c.responses.create(model="stub", input=f"SCRIPT:{MIXED}", tools=TOOLS)
    kinds = [o.type for o in r.output]
    assert kinds == ["reasoning", "message", "function_call"]
    reasoning, msg, call = r.output
    assert reasoning.content[0].text == "\nneed the weather\n"  # type: ignore[union-attr]
    assert msg.content[0].text == "Checking now. "  # type: ignore[union-attr]
    assert call.name == "get_weather" and call.call_id.startswith("call_")  # type: ignore[union-attr]
    assert json.loads(call.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens > 0
    # second turn: the call and its output go back as items; the output is the prompt's last word
    follow: list[Any] = [{"role": "user", "content": "weather?"},
                         {"type": "function_call", "call_id": call.call_id,  # type: ignore[union-attr]
                          "name": "get_weather", "arguments": call.arguments},  # type: ignore[union-attr]
                         {"type": "function_call_output", "call_id": call.call_id,  # type: ignore[union-attr]
                          "output": "SCRIPT:Sunny in Paris."}]
    r2 = c.responses.create(model="stub", input=follow, tools=TOOLS)
    assert r2.output_text.startswith("Sunny in Paris.")


def collect(served: Served, **kw: Any) -> list[Any]:
    return list(served.client().responses.create(model="stub", stream=True, **kw))


def test_streaming_events_add_up_to_the_response(served: Served) -> None:
    whole = served.client().responses.create(model="stub", input=f"SCRIPT:{MIXED}", tools=TOOLS)
    events = collect(served, input=f"SCRIPT:{MIXED}", tools=TOOLS)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for t in ("response.reasoning_text.delta", "response.output_text.delta",
              "response.output_text.done", "response.function_call_arguments.delta",
              "response.function_call_arguments.done", "response.output_item.added",
              "response.output_item.done", "response.content_part.added"):
        assert t in types, t
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert text == done.text == "Checking now. "
    final = events[-1].response
    strip = ("id", "call_id")

    def shape(r: Any) -> list[dict[str, Any]]:
        return [{k: v for k, v in o.model_dump().items() if k not in strip} for o in r.output]

    assert shape(final) == shape(whole)
    assert final.usage.output_tokens == whole.usage.output_tokens  # type: ignore[union-attr]
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call"]


def test_sdk_stream_helper_accumulates(served: Served) -> None:
    with served.client().responses.stream(model="stub", input="SCRIPT:One two three.") as s:
        final = s.get_final_response()
    assert final.output_text == "One two three."


def test_max_output_tokens_is_incomplete(served: Served) -> None:
    r = served.client().responses.create(model="stub", input="SCRIPT:" + "word " * 30,
                                         max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    events = collect(served, input="SCRIPT:" + "word " * 30, max_output_tokens=3)
    assert events[-1].type == "response.incomplete"


@pytest.mark.parametrize("kw, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_requests_are_400(served: Served, kw: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        served.client().responses.create(model="stub", **kw)
    err = e.value.body
    assert isinstance(err, dict) and (err.get("param") or "").startswith(param), err


def test_malformed_body_is_400(served: Served) -> None:
    r = httpx.post(f"{served.base}/v1/responses", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{served.base}/v1/responses", json={"input": "SCRIPT:x", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_stream_closed_early_aborts_the_request(stub: tuple[Served, ScriptedEngine]) -> None:
    served, engine = stub
    engine.gate.clear()  # the engine holds the request: only the client can end it
    try:
        body = {"model": "stub", "input": "SCRIPT:never finished", "stream": True}
        with httpx.stream("POST", f"{served.base}/v1/responses", json=body, timeout=10) as r:
            first = next(line for line in r.iter_lines() if line.startswith("event:"))
            assert first == "event: response.created"
            assert engine.waiting or engine.running
        deadline = time.monotonic() + 5
        while engine.waiting or engine.running:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.02)
    finally:
        engine.gate.set()
