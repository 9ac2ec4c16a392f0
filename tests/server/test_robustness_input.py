"""What a hostile client sends (issue 20, findings 2-5): request-supplied chat templates, huge
prompts, invalid Unicode, deep JSON and tool calls cut by max_tokens, against a real HTTP server
whose engine is the scripted stub."""

from __future__ import annotations

import json
import threading
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

MODEL = "stub"
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]
CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
        '</tool_call>')


class Stub:
    def __init__(self, base: str, state: ServerState, server: ThreadServer) -> None:
        self.base, self.state, self.server = base, state, server

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        if isinstance(body, (bytes, str)):
            return httpx.post(f"{self.base}{path}", content=body,
                              headers={"content-type": "application/json"}, timeout=60, **kw)
        return httpx.post(f"{self.base}{path}", json=body, timeout=60, **kw)


@pytest.fixture(scope="module")
def stub() -> Iterator[Stub]:
    engine = ScriptedEngine(load_tokenizer(resolve_model(None)), max_model_len=2048)
    state = ServerState(model_name=MODEL)
    server = ThreadServer(create_app(state, lambda: engine))
    with server as base:
        wait_healthy(base, 30)
        yield Stub(base, state, server)


def assert_openai_400(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str)
    return dict(err)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---- finding 2: request-supplied chat templates ------------------------------------------------

def test_request_chat_template_refused_by_default(stub: Stub) -> None:
    body = {"messages": user("SCRIPT:hi"), "max_tokens": 5,
            "chat_template_kwargs": {"chat_template": "{{ 'SCRIPT:owned' }}"}}
    err = assert_openai_400(stub.post("/v1/chat/completions", body))
    assert err["code"] == "chat_template_not_allowed"
    assert "--trust-request-chat-template" in err["message"]
    tok = {"messages": user("x"), "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}
    assert_openai_400(stub.post("/tokenize", tok))
    # the model's own template, with harmless kwargs, still works
    ok = stub.post("/v1/chat/completions", {"messages": user("SCRIPT:fine"), "max_tokens": 5,
                                            "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "fine"


@pytest.fixture
def trusting(stub: Stub) -> Iterator[Stub]:
    stub.state.trust_request_chat_template = True
    try:
        yield stub
    finally:
        stub.state.trust_request_chat_template = False


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",  # 100 MB of output
    "{{ 'x' * 1000000000 }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ 'x' | center(1000000000) }}",
])
def test_trusted_request_template_is_bounded(trusting: Stub, template: str) -> None:
    body = {"messages": user("x"), "max_tokens": 5,
            "chat_template_kwargs": {"chat_template": template}}
    slowest = 0.0
    done = threading.Event()

    def probe() -> None:
        nonlocal slowest
        while not done.is_set():
            t = time.monotonic()
            assert httpx.get(f"{trusting.base}/health", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.monotonic()
    try:
        r = trusting.post("/v1/chat/completions", body)
    finally:
        done.set()
        prober.join()
    assert_openai_400(r)
    assert r.json()["error"]["code"] == "invalid_chat_template"
    assert time.monotonic() - t0 < 8  # the renderer gives up after 5 s at most
    assert slowest < 1.0


def test_trusted_request_template_renders(trusting: Stub) -> None:
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    r = trusting.post("/v1/chat/completions", {
        "messages": user("SCRIPT:templated"), "max_tokens": 10,
        "chat_template_kwargs": {"chat_template": template}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "templated"


# ---- finding 3: tokenization off the event loop, huge prompts refused before tokenizing ---------

class ThreadRecorder:
    """Wraps the tokenizer and records the threads its work ran on."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.threads: list[str] = []

    def _note(self) -> None:
        self.threads.append(threading.current_thread().name)

    def __call__(self, *a: Any, **kw: Any) -> Any:
        self._note()
        return self._tok(*a, **kw)

    def decode(self, *a: Any, **kw: Any) -> Any:
        self._note()
        return self._tok.decode(*a, **kw)

    def apply_chat_template(self, *a: Any, **kw: Any) -> Any:
        self._note()
        return self._tok.apply_chat_template(*a, **kw)

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_tokenizer_work_runs_off_the_event_loop(stub: Stub) -> None:
    real = stub.state.tokenizer
    rec = ThreadRecorder(real)
    stub.state.tokenizer = rec
    try:
        assert stub.post("/tokenize", {"prompt": "hello there"}).status_code == 200
        assert stub.post("/tokenize", {"messages": user("hello")}).status_code == 200
        assert stub.post("/detokenize", {"tokens": [1, 2, 3]}).status_code == 200
        r = stub.post("/v1/chat/completions", {
            "messages": user("SCRIPT:<think>mull it over</think>done"), "max_tokens": 40})
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
        assert stub.post("/v1/completions", {"prompt": "SCRIPT:x", "max_tokens": 3,
                                             "echo": True}).status_code == 200
    finally:
        stub.state.tokenizer = real
    loop_thread = stub.server.thread.name
    assert rec.threads, "the tokenizer was never called"
    assert loop_thread not in rec.threads, rec.threads


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"prompt": "a " * 1_500_000}),
    ("/tokenize", {"messages": user("a " * 1_500_000)}),
    ("/v1/chat/completions", {"messages": user("a " * 1_500_000), "max_tokens": 5}),
    ("/v1/completions", {"prompt": "a " * 1_500_000, "max_tokens": 5}),
])
def test_huge_prompt_refused_before_tokenizing(stub: Stub, path: str, body: Any) -> None:
    real = stub.state.tokenizer
    rec = ThreadRecorder(real)
    stub.state.tokenizer = rec
    try:
        r = stub.post(path, body)
    finally:
        stub.state.tokenizer = real
    err = assert_openai_400(r)
    assert err["code"] == "context_length_exceeded"
    assert not rec.threads  # refused on its length alone: never tokenized nor rendered


# ---- finding 4: invalid Unicode and deep JSON are 400s, not 500s -------------------------------

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "\\udc00"}]}]}'),
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 3}'),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff\\ud800"], "max_tokens": 3}'),
    ("/tokenize", '{"prompt": "\\ud800"}'),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
])
def test_lone_surrogate_is_400(stub: Stub, path: str, body: str) -> None:
    err = assert_openai_400(stub.post(path, body))
    assert "surrogate" in err["message"]


def test_surrogate_pair_is_fine(stub: Stub) -> None:
    r = stub.post("/tokenize", '{"prompt": "smile \\ud83d\\ude00"}')
    assert r.status_code == 200 and r.json()["count"] > 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
@pytest.mark.parametrize("depth", [200, 990, 5000])
def test_deep_json_is_400(stub: Stub, path: str, depth: int) -> None:
    deep = '{"a": ' * depth + "1" + "}" * depth
    head = '{"prompt": "x", ' if path != "/v1/chat/completions" else \
        '{"messages": [{"role": "user", "content": "x"}], '
    assert_openai_400(stub.post(path, head + f'"metadata": {deep}}}'))
    arr = "[" * depth + "]" * depth
    assert_openai_400(stub.post(path, head + f'"stop": {arr}}}'))
    assert httpx.get(f"{stub.base}/health").status_code == 200


# ---- finding 5: a tool call cut by max_tokens ----------------------------------------------------

def test_tool_call_cut_by_max_tokens(stub: Stub) -> None:
    body = {"messages": user(f"SCRIPT:Checking. {CALL}"), "tools": TOOLS, "max_tokens": 12}
    r = stub.post("/v1/chat/completions", body)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    msg = choice["message"]
    assert not msg.get("tool_calls")
    assert msg["content"].startswith("Checking. <tool_call>")
    assert not msg["content"].endswith("</tool_call>")  # the model never wrote it
    with httpx.stream("POST", f"{stub.base}/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: {")]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls") or []]
    assert calls == []  # no name, no half of the arguments
    assert content == msg["content"]
    assert deltas[-1]["finish_reason"] == "length"


def test_tool_call_complete_streams_valid_json(stub: Stub) -> None:
    body = {"messages": user(f"SCRIPT:{CALL}"), "tools": TOOLS, "max_tokens": 200,
            "stream": True}
    with httpx.stream("POST", f"{stub.base}/v1/chat/completions", json=body, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: {")]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    args = "".join(tc["function"].get("arguments") or "" for d in deltas
                   for tc in d["delta"].get("tool_calls") or [])
    assert json.loads(args) == {"city": "Paris", "days": [1, 2]}
    assert deltas[-1]["finish_reason"] == "tool_calls"
