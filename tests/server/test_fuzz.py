"""Property-based fuzzing of the request bodies (issue 20): random JSON, and random variations of
plausible chat and completions bodies, posted to a real HTTP server whose engine is the scripted
stub. Whatever comes in: no 5xx, /health stays fast, the engine stays alive and every request it
was given ends."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from spillover.server.api import create_app
from spillover.server.serving import ServerState
from spillover.weights.resolve import load_tokenizer, resolve_model
from tests.server.conftest import ThreadServer, wait_healthy
from tests.server.stub_engine import ScriptedEngine

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
from hypothesis import HealthCheck, given, settings  # noqa: E402

MODEL = "stub"


class Target:
    def __init__(self, base: str, state: ServerState, engine: ScriptedEngine) -> None:
        self.base, self.state, self.engine = base, state, engine
        self.http = httpx.Client(base_url=base, timeout=60)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    engine = ScriptedEngine(load_tokenizer(resolve_model(None)), max_model_len=512)
    state = ServerState(model_name=MODEL)
    with ThreadServer(create_app(state, lambda: engine)) as base:
        wait_healthy(base, 30)
        t = Target(base, state, engine)
        yield t
        t.http.close()


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, 1, -1, 2, 5, 20, 21, 128, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "\ud800", "\udfff x", "SCRIPT:hi", "<tool_call>", "<think>", "auto",
                     "none", "required", "json_object", "text", "user", "assistant", MODEL]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)

ROLES = st.sampled_from(["user", "system", "assistant", "tool", "developer", "function",
                         "wizard", ""])
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]), "function": st.one_of(
    json_values, st.fixed_dictionaries({"name": st.one_of(st.text(max_size=10), json_values)},
                                       optional={"parameters": json_values}))})

text = st.one_of(st.text(max_size=30), st.sampled_from(
    ["SCRIPT:hi", "a\ud800b", "\udfff", "\ud83d\ude00", "SCRIPT:<tool_call>{\"name\": \"f\"",
     "SCRIPT:<think>x</think>y", "<|im_end|>", ""]))


def sometimes(plausible: Any) -> Any:
    """Mostly a plausible value, sometimes any JSON: bodies that get past validation reach the
    template, the tokenizer and the engine."""
    return st.one_of(plausible, plausible, plausible, plausible, plausible, json_values)


def ints(lo: int, hi: int) -> Any:
    return st.one_of(st.integers(min_value=lo, max_value=hi),
                     st.sampled_from([lo - 1, hi + 1, 2 ** 63, 2 ** 64, -(2 ** 63) - 1]))


FIELDS: dict[str, Any] = {
    "model": st.sampled_from([MODEL, "other"]),
    "max_tokens": ints(0, 600), "max_completion_tokens": ints(0, 600),
    "temperature": st.floats(allow_nan=True, allow_infinity=True),
    "top_p": st.floats(min_value=-1, max_value=2), "top_k": ints(-1, 100),
    "min_p": st.floats(min_value=-1, max_value=2), "n": ints(0, 4), "seed": ints(-5, 5),
    "stop": st.one_of(text, st.lists(text, max_size=5)),
    "stop_token_ids": st.lists(ints(0, 50000), max_size=3),
    "logit_bias": st.dictionaries(st.one_of(st.text(max_size=5), st.integers().map(str)),
                                  st.floats(min_value=-200, max_value=200), max_size=3),
    "logprobs": st.one_of(st.booleans(), ints(0, 20)), "top_logprobs": ints(0, 21),
    "presence_penalty": st.floats(min_value=-3, max_value=3),
    "frequency_penalty": st.floats(min_value=-3, max_value=3),
    "repetition_penalty": st.floats(min_value=-1, max_value=3), "min_tokens": ints(0, 20),
    "ignore_eos": st.booleans(), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(
        ["text", "json_object", "json_schema", "regex"])}), st.fixed_dictionaries(
        {"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
            {"name": st.just("x"), "schema": json_values})})),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]),
                             st.fixed_dictionaries({"type": st.just("function"),
                                                    "function": st.fixed_dictionaries(
                                                        {"name": st.text(max_size=5)})})),
    "parallel_tool_calls": st.booleans(),
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(["enable_thinking", "chat_template", "tools", "x"]), json_values,
        max_size=2),
    "reasoning_effort": st.sampled_from(["none", "low", "high", "max"]),
    "echo": st.booleans(), "suffix": text, "best_of": ints(0, 3), "prompt_logprobs": ints(0, 3),
    "user": text, "unknown_field": json_values,
}
extra = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.just(None), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: sometimes(FIELDS[k]) for k in keys}))
message = st.fixed_dictionaries(
    {"role": ROLES, "content": st.one_of(text, text, json_values, st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text}),
        max_size=2))},
    optional={"tool_calls": json_values, "tool_call_id": text})
chat_body = st.builds(lambda msgs, tools, ex: {"messages": msgs, **({"tools": tools} if tools
                                                                  else {}), **ex},
                      st.one_of(st.lists(message, min_size=1, max_size=3),
                                st.lists(message, min_size=1, max_size=3), json_values),
                      st.one_of(st.none(), st.none(), st.lists(tool, max_size=2), json_values),
                      extra)
completion_body = st.builds(lambda prompt, ex: {"prompt": prompt, **ex},
                            st.one_of(text, text, json_values, st.lists(text, max_size=3),
                                      st.lists(st.integers(min_value=-5, max_value=70000),
                                               max_size=5)),
                            extra)
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions"])


def encode(body: Any) -> bytes:
    # allow_nan: Python's json (the server's parser) reads NaN/Infinity, so clients can send them
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


STATUSES: dict[int, int] = {}


def check(target: Target, path: str, raw: bytes) -> None:
    r = target.http.post(path, content=raw, headers={"content-type": "application/json"})
    STATUSES[r.status_code] = STATUSES.get(r.status_code, 0) + 1
    assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"], r.text[:300]
    t = time.monotonic()
    h = target.http.get("/health", timeout=5)
    assert h.status_code == 200 and time.monotonic() - t < 1.0


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=st.one_of(st.tuples(st.just("/v1/chat/completions"), chat_body),
                      st.tuples(st.just("/v1/completions"), completion_body),
                      st.tuples(PATHS, st.one_of(json_values, chat_body, completion_body))))
def test_fuzz_bodies(target: Target, case: tuple[str, Any]) -> None:
    path, body = case
    check(target, path, encode(body))


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(path=PATHS, raw=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(
    lambda s: s.encode("utf-8", "surrogatepass"))))
def test_fuzz_raw_bytes(target: Target, path: str, raw: bytes) -> None:
    check(target, path, raw)


def test_engine_alive_and_idle_after_fuzzing(target: Target) -> None:
    """Runs after the fuzz tests in this module: nothing left running, the engine serves."""
    deadline = time.monotonic() + 10
    while target.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not target.engine.has_unfinished()
    # the fuzzing reached the engine, too (how many bodies pass validation moves with the
    # examples hypothesis draws: 18 to 41 of 350 were seen)
    assert STATUSES.get(200, 0) >= 10, STATUSES
    assert target.state.bridge is not None and target.state.bridge.alive
    r = target.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "SCRIPT:still here"}], "max_tokens": 10})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "still here"
