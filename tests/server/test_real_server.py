"""`spillover serve` on the real demo model, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import Served

MSG = [{"role": "user", "content": "Name a color."}]


def metrics(served: Served) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{served.base}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def test_models_health_version(real_server: Served) -> None:
    c = real_server.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == [real_server.model]
    assert c.models.retrieve(real_server.model).id == real_server.model
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert httpx.get(f"{real_server.base}/health").json() == {"status": "ok"}
    assert "version" in httpx.get(f"{real_server.base}/version").json()


def test_chat_and_stream_agree(real_server: Served) -> None:
    c = real_server.client()
    r = c.chat.completions.create(model=real_server.model, messages=MSG, max_tokens=6,
                                  temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.message.content
    assert ch.finish_reason in ("stop", "length")
    u = r.usage
    assert u is not None and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens <= 6
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens is not None

    chunks = list(c.chat.completions.create(model=real_server.model, messages=MSG, max_tokens=6,
                                            temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
    assert text == ch.message.content
    finishes = [x.choices[0].finish_reason for x in chunks
                if x.choices and x.choices[0].finish_reason]
    assert finishes == [ch.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens  # type: ignore[union-attr]
    assert len({x.id for x in chunks}) == 1


def test_raw_sse_framing(real_server: Served) -> None:
    body = {"messages": MSG, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{real_server.base}/v1/chat/completions", json=body,
                      headers={"X-Request-Id": "abc-123"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "abc-123"
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_sampling_fields(real_server: Served) -> None:
    c = real_server.client()
    kw: dict[str, Any] = {"model": real_server.model, "messages": MSG}
    r = c.chat.completions.create(max_completion_tokens=2, temperature=0, **kw)
    assert r.usage is not None and r.usage.completion_tokens == 2
    assert r.choices[0].finish_reason == "length"
    sampled = dict(max_tokens=3, temperature=1.0, seed=7, top_p=0.9, **kw)
    a = c.chat.completions.create(**sampled).choices[0].message.content
    b = c.chat.completions.create(**sampled).choices[0].message.content
    assert a == b
    r = c.chat.completions.create(max_tokens=3, n=2, temperature=1.0, presence_penalty=0.5,
                                  frequency_penalty=0.5,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                              "min_tokens": 1},
                                  **kw)
    assert [x.index for x in r.choices] == [0, 1]
    first = c.chat.completions.create(max_tokens=5, temperature=0, **kw).choices[0]
    greedy = first.message.content or ""
    word = greedy.split()[1] if len(greedy.split()) > 1 else greedy[:3]
    r = c.chat.completions.create(max_tokens=5, temperature=0, stop=[word], **kw)
    assert r.choices[0].finish_reason == "stop" and word not in (r.choices[0].message.content or "")
    # logit_bias can force a token: 100 on one id makes greedy pick it.
    tok = httpx.post(f"{real_server.base}/tokenize",
                     json={"prompt": " banana", "add_special_tokens": False}).json()
    r = c.chat.completions.create(max_tokens=1, temperature=0,
                                  logit_bias={str(tok["tokens"][0]): 100}, **kw)
    assert r.choices[0].message.content == tok["token_strs"][0]


def test_logprobs(real_server: Served) -> None:
    c = real_server.client()
    r = c.chat.completions.create(model=real_server.model, messages=MSG, max_tokens=3,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.token == e.top_logprobs[0].token  # greedy picks the top token
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=real_server.model, messages=MSG, logprobs=True,
                                  top_logprobs=21)


def _valid(obj: Any, schema: dict[str, Any]) -> bool:
    t = schema.get("type")
    if t == "object":
        if not isinstance(obj, dict):
            return False
        props = schema.get("properties", {})
        return (all(k in obj for k in schema.get("required", []))
                and all(_valid(obj[k], s) for k, s in props.items() if k in obj)
                and (schema.get("additionalProperties", True) or set(obj) <= set(props)))
    if t == "array":
        return isinstance(obj, list) and all(_valid(x, schema["items"]) for x in obj)
    if t == "string":
        return isinstance(obj, str) and ("enum" not in schema or obj in schema["enum"])
    if t == "integer":
        return isinstance(obj, int) and not isinstance(obj, bool)
    if t == "boolean":
        return isinstance(obj, bool)
    return True


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "maximum": 999},
                         "pet": {"type": "string", "enum": ["cat", "dog"]}}}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(real_server: Served, stream: bool) -> None:
    c = real_server.client()
    kw: dict[str, Any] = {"model": real_server.model, "max_tokens": 30, "temperature": 0,
                          "messages": [{"role": "user", "content": "Describe a person as JSON."}],
                          "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "p", "schema": SCHEMA}}}
    if stream:
        text = "".join(x.choices[0].delta.content or ""
                       for x in c.chat.completions.create(stream=True, **kw)
                       if x.choices)
    else:
        r = c.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content or ""
    assert _valid(json.loads(text), SCHEMA), text
    if stream:
        return
    r = c.chat.completions.create(model=real_server.model, messages=MSG, max_tokens=40,
                                  temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_forced_tool_call_on_real_model(real_server: Served) -> None:
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"], "additionalProperties": False}}}]
    r = real_server.client().chat.completions.create(
        model=real_server.model, messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=48, temperature=0)  # the tags alone take ~12 tokens with this tokenizer
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_completions(real_server: Served) -> None:
    c = real_server.client()
    r = c.completions.create(model=real_server.model, prompt="The sky is", max_tokens=3,
                             temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert r.object == "text_completion" and ch.text.startswith("The sky is")
    lp = ch.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) >= 3 + 3
    assert "".join(lp.tokens) == ch.text
    r = c.completions.create(model=real_server.model, prompt=["One", "Two"], max_tokens=2, n=2,
                             temperature=0)
    assert sorted(x.index for x in r.choices) == [0, 1, 2, 3]
    ids = httpx.post(f"{real_server.base}/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    r = c.completions.create(model=real_server.model, prompt=ids, max_tokens=2, temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model=real_server.model, prompt="Hi", max_tokens=3,
                                       stream=True, echo=True,
                                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].text.startswith("Hi") and chunks[-1].usage.completion_tokens == 3  # type: ignore[union-attr]


def test_tokenize_roundtrip(real_server: Served) -> None:
    t = httpx.post(f"{real_server.base}/tokenize", json={"prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 1024
    detok = httpx.post(f"{real_server.base}/detokenize", json={"tokens": t["tokens"]}).json()
    assert detok["prompt"] == "Hello world"
    m = httpx.post(f"{real_server.base}/tokenize", json={"messages": MSG}).json()
    r = real_server.client().chat.completions.create(model=real_server.model, messages=MSG,
                                                     max_tokens=1)
    assert r.usage is not None and m["count"] == r.usage.prompt_tokens


ERRORS: list[tuple[str, Any, int, str | None]] = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "stream_options": {"include_usage": True}}, 400,
     None),
    ("/v1/chat/completions", {"messages": MSG, "tool_choice": "auto"}, 400, None),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400,
     None),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, None),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize("path, body, status, param", ERRORS)
def test_client_errors(real_server: Served, path: str, body: Any, status: int,
                       param: str | None) -> None:
    kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{real_server.base}{path}", headers={"content-type": "application/json"},
                   timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert (err["param"] or "").startswith(param)


def test_context_length_exceeded(real_server: Served) -> None:
    long = "word " * 1100
    with pytest.raises(openai.BadRequestError) as e:
        real_server.client().chat.completions.create(model=real_server.model,
                                                     messages=[{"role": "user", "content": long}],
                                                     max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "1024" in e.value.message
    assert real_server.client().chat.completions.create(model=real_server.model, messages=MSG,
                                                        max_tokens=1)


def test_metrics_names(real_server: Served) -> None:
    m = metrics(real_server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "prefix_cache_hits_total",
                 "prefix_cache_queries_total"):
        assert f"spillover:{name}" in m
    assert m["spillover:generation_tokens_total"] > 0
    assert m["spillover:time_to_first_token_seconds_count"] > 0


def _settled(served: Served, free0: float, within: float) -> dict[str, float]:
    deadline = time.monotonic() + within
    while True:
        m = metrics(served)
        idle = m["spillover:num_requests_running"] == 0
        if idle and m["spillover:kv_cache_blocks_free"] == free0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"not released within {within} s: {m}")
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts(real_server: Served) -> None:
    m0 = _settled(real_server, metrics(real_server)["spillover:kv_cache_blocks_total"], 5)
    free0 = m0["spillover:kv_cache_blocks_free"]
    body = {"messages": MSG, "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{real_server.base}/v1/chat/completions", json=body,
                      timeout=60) as r:
        lines = r.iter_lines()
        got: list[str] = []
        for ln in lines:
            if ln:
                got.append(ln)
            if len(got) == 3:  # role chunk + two content chunks
                break
        assert metrics(real_server)["spillover:num_requests_running"] == 1
        assert metrics(real_server)["spillover:kv_cache_blocks_free"] < free0
    closed = time.monotonic()
    _settled(real_server, free0, 1.0)
    assert time.monotonic() - closed < 1.0
    assert metrics(real_server)["spillover:http_requests_client_disconnected_total"] >= 1
    assert real_server.client().chat.completions.create(model=real_server.model, messages=MSG,
                                                        max_tokens=2)


def test_disconnect_non_streaming_aborts(real_server: Served) -> None:
    free0 = metrics(real_server)["spillover:kv_cache_blocks_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{real_server.base}/v1/chat/completions", timeout=1.5,
                   json={"messages": MSG, "max_tokens": 500, "ignore_eos": True})
    _settled(real_server, free0, 1.0)


# Probes /health from its own process, so the latency measured is the server's and not this
# process's (which is busy parsing 64 streams).
PROBE = """
import select, sys, time, json, httpx
lat = []
with httpx.Client() as h:
    h.get(sys.argv[1])  # connect once; what is measured is the server's answer time
    while not select.select([sys.stdin], [], [], 0)[0] and len(lat) < 3000:
        t = time.perf_counter()
        assert h.get(sys.argv[1]).status_code == 200
        lat.append(time.perf_counter() - t)
        time.sleep(0.1)
print(json.dumps(lat))
"""


def test_64_concurrent_streams_and_fast_health(real_server: Served) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{real_server.base}/v1", api_key="x", max_retries=0,
                                    timeout=240)

        async def one(i: int) -> str:
            s = await client.chat.completions.create(
                model=real_server.model, messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=4, temperature=0, stream=True, extra_body={"ignore_eos": True})
            reasons = [c.choices[0].finish_reason async for c in s
                       if c.choices and c.choices[0].finish_reason]
            return reasons[0] if len(reasons) == 1 else f"bad {reasons}"

        return list(await asyncio.gather(*(one(i) for i in range(64))))

    prober = subprocess.Popen([sys.executable, "-c", PROBE, f"{real_server.base}/health"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        results = asyncio.run(main())
    finally:
        out, _ = prober.communicate("stop\n", timeout=30)
    lat = json.loads(out)
    assert results == ["length"] * 64
    assert len(lat) >= 10 and max(lat) < 0.1, f"health latencies {sorted(lat)[-5:]}"
