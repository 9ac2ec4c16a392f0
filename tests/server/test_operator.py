"""What operators expect from vLLM-like servers (issue 20): request bodies in /openapi.json,
unknown request fields ignored with a warning, CORS, the access log, a warning when listening
beyond this machine with no API key, and `Allow` on 405."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from spillover.cli.serve import add_serve_parser, exposure_warning, parse_origins
from spillover.server.api import create_app
from spillover.server.protocol import (
    REQUEST_MODELS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse,
)
from spillover.server.serving import ServerState
from spillover.weights.resolve import load_tokenizer, resolve_model
from tests.server.conftest import ThreadServer, wait_healthy
from tests.server.stub_engine import ScriptedEngine

MODEL = "stub"
MSG = [{"role": "user", "content": "hi"}]


def app_client(**kw: Any) -> TestClient:
    """No engine (the lifespan does not run): enough for routes that answer before it."""
    return TestClient(create_app(ServerState(model_name=MODEL), **kw))


@pytest.fixture(scope="module")
def stub() -> Iterator[str]:
    engine = ScriptedEngine(load_tokenizer(resolve_model(None)))
    with ThreadServer(create_app(ServerState(model_name=MODEL), lambda: engine)) as base:
        wait_healthy(base, 30)
        yield base


# ---- /openapi.json ---------------------------------------------------------------------------

def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/")
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return dict(node)


@pytest.mark.parametrize("path", sorted(REQUEST_MODELS))
def test_openapi_publishes_request_bodies(path: str) -> None:
    doc = app_client().get("/openapi.json").json()
    body = doc["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    schema = resolve(doc, body["content"]["application/json"]["schema"])
    model = REQUEST_MODELS[path]
    assert set(schema["properties"]) == set(model.model_json_schema()["properties"])
    # Every reference in the document resolves (the models' nested types are published too).
    text = str(doc)
    for name in doc["components"]["schemas"]:
        assert name in text
    for ref in _refs(doc):
        assert resolve(doc, {"$ref": ref})


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_openapi_chat_messages_schema() -> None:
    doc = app_client().get("/openapi.json").json()
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert "messages" in chat["required"]
    item = resolve(doc, chat["properties"]["messages"]["items"])
    assert {"role", "content"} <= set(item["properties"])


# ---- unknown fields: ignored with a warning -------------------------------------------------

def test_unknown_fields_ignored_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spillover.server"):
        req = parse({"messages": MSG, "bogus_field": 1, "x_vendor": {"a": 1}},
                    ChatCompletionRequest)
    assert isinstance(req, ChatCompletionRequest)
    assert not (req.model_extra or {})
    assert "bogus_field" in caplog.text and "x_vendor" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spillover.server"):
        parse({"prompt": "x", "max_tokens": 2, "user": "u"}, CompletionRequest)
    assert "ignoring" not in caplog.text  # a known (ignored) OpenAI field: no warning


def test_wrong_type_of_known_field_is_still_400() -> None:
    with pytest.raises(APIError) as e:
        parse({"messages": MSG, "temperature": "hot", "bogus": 1}, ChatCompletionRequest)
    assert e.value.status == 400 and e.value.param == "temperature"
    with pytest.raises(APIError) as e:
        parse({"messages": MSG, "audio": {}}, ChatCompletionRequest)
    assert e.value.status == 400 and e.value.code == "unsupported_parameter"


def test_unknown_fields_over_http(stub: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spillover.server"):
        r = httpx.post(f"{stub}/tokenize", json={"prompt": "hello", "bogus_field": 1},
                       timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["count"] > 0
    assert "bogus_field" in caplog.text
    r = httpx.post(f"{stub}/tokenize", json={"prompt": 5, "bogus_field": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# ---- 405 ------------------------------------------------------------------------------------

def test_405_has_allow_header() -> None:
    c = app_client()
    r = c.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"]["message"]
    r = c.post("/health")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


# ---- CORS -----------------------------------------------------------------------------------

def test_cors_off_by_default() -> None:
    r = app_client().get("/version", headers={"Origin": "https://a.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allowed_origins() -> None:
    c = app_client(allowed_origins=["https://a.example"])
    pre = c.options("/v1/chat/completions",
                    headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST",
                             "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://a.example"
    r = c.get("/version", headers={"Origin": "https://a.example"})
    assert r.headers["access-control-allow-origin"] == "https://a.example"
    r = c.get("/version", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ---- serve's flags --------------------------------------------------------------------------

def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_flags_defaults_and_values() -> None:
    a = serve_args()
    assert a.access_log is False and parse_origins(a.allowed_origins) is None
    a = serve_args("--access-log", "--allowed-origins", "https://a.example, https://b.example")
    assert a.access_log is True
    assert parse_origins(a.allowed_origins) == ["https://a.example", "https://b.example"]
    assert parse_origins("*") == ["*"]


@pytest.mark.parametrize("host, key, warns", [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("127.0.0.2", None, False), ("0.0.0.0", None, True), ("::", None, True),
    ("192.168.1.5", None, True), ("myhost.example", None, True), ("0.0.0.0", "k", False),
])
def test_exposure_warning(host: str, key: str | None, warns: bool) -> None:
    w = exposure_warning(host, key)
    assert (w is not None) == warns
    if w is not None:
        assert host in w and "--api-key" in w
