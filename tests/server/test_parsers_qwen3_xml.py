"""Qwen3-Coder's XML tool calls: typed arguments, literal tags inside values, and streaming that
agrees with non-streaming on every prefix of the output, in any chunking."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from spillover.server.chat import render_messages, template_tool_format
from spillover.server.parsers import OutputParser
from spillover.server.protocol import ChatMessage, ToolDef
from spillover.server.qwen3_xml import convert_value
from tests.server.qwen3_coder_template import QWEN3_CODER_TEMPLATE

PROPS: dict[str, dict[str, Any]] = {
    "get_weather": {"city": {"type": "string"}, "days": {"type": "integer"},
                    "metric": {"type": "boolean"}, "hours": {"type": "array"}},
    "write_file": {"path": {"type": "string"}, "content": {"type": "string"},
                   "mode": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
}


def xml_call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


WEATHER = xml_call("get_weather", city="Paris", days="3", metric="true", hours="[9, 12]")
# Code is why the format exists: a value may hold any tag, closing ones included.
CODE = 'if a</parameter> and b:\n    s = "</tool_call>"\n    t = "<parameter=x>"\n'
WRITE = xml_call("write_file", path="/tmp/a b.py", content=CODE, mode="null")


def outcome(text: str, step: int) -> tuple[str, str, list[Any], list[Any]]:
    """Content, reasoning, final calls and streamed calls, feeding `step` characters at a time
    (the last piece final, as the server does; one piece is non-streaming)."""
    p = OutputParser(parse_tools=True, parse_reasoning=True, tool_format="qwen3_xml",
                     tool_properties=PROPS)
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    streamed: dict[int, list[Any]] = {}
    for k, piece in enumerate(pieces):
        d = p.feed(piece, final=k == len(pieces) - 1)
        for idx, cid, name, args in d.tool_calls:
            slot = streamed.setdefault(idx, [None, ""])
            if cid is not None:
                slot[0] = name
            slot[1] += args
    final = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in p.final_calls()]
    sent = [(s[0], json.loads(s[1])) for _, s in sorted(streamed.items())]
    return p.content, p.reasoning, final, sent


def test_typed_arguments_and_literal_tags_in_values() -> None:
    text = f"<think>\nneed data\n</think>\n\nChecking. {WEATHER}\n{WRITE}\n"
    for step in (1, 4, 10_000):
        content, reasoning, final, sent = outcome(text, step)
        assert reasoning == "\nneed data\n"
        assert content == "Checking. "
        assert final == sent == [
            ("get_weather", {"city": "Paris", "days": 3, "metric": True, "hours": [9, 12]}),
            ("write_file", {"path": "/tmp/a b.py", "content": CODE, "mode": None})]


@pytest.mark.parametrize("value, schema, expected", [
    ("42", {"type": "integer"}, 42),
    ("4.5", {"type": "number"}, 4.5),
    ("7", {"type": "number"}, 7),
    ("seven", {"type": "integer"}, "seven"),  # what the model wrote, not a guess
    ("True", {"type": "boolean"}, True),
    ("false", {"type": "boolean"}, False),
    ("maybe", {"type": "boolean"}, "maybe"),
    ('{"a": [1, null]}', {"type": "object"}, {"a": [1, None]}),
    ("{'a': True}", {"type": "object"}, {"a": True}),  # a Python repr, as some templates print
    ("[1, 2", {"type": "array"}, "[1, 2"),
    ("{1, 2}", {"type": "array"}, "{1, 2}"),  # a Python set is no JSON value
    ("null", {"type": "string"}, "null"),
    ("null", {"type": ["string", "null"]}, None),
    ("None", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
    ("  spaced  ", {"type": "string"}, "  spaced  "),
    ("12", None, "12"),  # a parameter the tool does not declare stays text
])
def test_convert_value_by_schema(value: str, schema: Any, expected: Any) -> None:
    assert convert_value(value, schema) == expected


PREFIX_OUTPUTS = [
    f"<think>\nplan\n</think>\n\nLet me look. {WEATHER}\n{WRITE}\n done.",
    # a model that forgot </function>, and a hermes JSON body
    'a <tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n</tool_call>'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call> b',
    # not a call: prose and placeholders come back as text
    "<tool_call>\n<function={{ name }}>\n</function>\n</tool_call> x <tool_call> hi </tool_call>",
    f"{WEATHER} trailing text <tool_call>\n<function=write_file>\n<parameter=content>\n"
    "cut here",
]


@pytest.mark.parametrize("text", PREFIX_OUTPUTS)
def test_streaming_agrees_on_every_prefix(text: str) -> None:
    """Output cut anywhere (max_tokens): streaming in any chunking gives what non-streaming gives,
    and a cut call comes back as text, never as a call with half its arguments."""
    for n in range(len(text) + 1):
        prefix = text[:n]
        whole = outcome(prefix, max(n, 1))
        assert whole[2] == whole[3], prefix
        for step in (1, 3, 7):
            assert outcome(prefix, step) == whole, (prefix, step)
        content = whole[0]
        assert content.count("</tool_call>") <= prefix.count("</tool_call>"), prefix


def test_cut_call_is_text_and_complete_function_is_a_call() -> None:
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    assert outcome(cut, 1) == ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
                               "", [], [])
    # stopped right after </function> (no </tool_call>): the call is complete
    done = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
           "</function>"
    assert outcome(done, 2)[2] == [("get_weather", {"city": "Paris"})]


def test_hermes_parser_is_unchanged_for_xml_text() -> None:
    # hermes stays the default: XML in a hermes template's output is not parsed as a call
    p = OutputParser(parse_tools=True, parse_reasoning=False)
    p.feed(WEATHER, final=True)
    assert p.final_calls() == [] and p.content == WEATHER


def test_format_is_chosen_from_the_template() -> None:
    xml_tok = SimpleNamespace(chat_template=QWEN3_CODER_TEMPLATE)
    hermes_tok = SimpleNamespace(chat_template="{{ messages }} <tool_call> {{ tools }}")
    assert template_tool_format(xml_tok, {}) == "qwen3_xml"
    assert template_tool_format(hermes_tok, {}) == "hermes"
    assert template_tool_format(hermes_tok, {"chat_template": QWEN3_CODER_TEMPLATE}) == "qwen3_xml"


def test_history_with_calls_renders_through_the_xml_template() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")))
    tok.chat_template = QWEN3_CODER_TEMPLATE
    tools = [ToolDef.model_validate({"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": PROPS["get_weather"]}}})]
    msgs = [ChatMessage.model_validate(m) for m in [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]]
    text = render_messages(tok, msgs, tools, {})
    assert "<name>get_weather</name>" in text and "<type>integer</type>" in text
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
           "<parameter=days>\n3\n</parameter>\n</function>" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
