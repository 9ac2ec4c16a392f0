"""The tool-call / reasoning parser on crafted text: streaming in any chunking equals one shot."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spillover.server.parsers import OutputParser, prompt_opens_thinking
from spillover.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse

CASES = [
    # (text, parse_tools, content, reasoning, [(name, args)])
    ("<think>\nplan\n</think>\n\nHello <tool_call>\n"
     "{\"name\": \"f\", \"arguments\": {\"a\": {\"b\": 1}}}\n</tool_call>",
     True, "Hello ", "\nplan\n", [("f", {"a": {"b": 1}})]),
    ("plain <tool answer < > </tool", True, "plain <tool answer < > </tool", "", []),
    ("x <tool_call>{\"name\": \"g\", \"arguments\": {\"q\": \"}\"}", True, "x ", "",
     [("g", {"q": "}"})]),
    ("<think>unclosed", True, "", "unclosed", []),
    ("<tool_call>not json</tool_call> ok", True, "<tool_call>not json</tool_call> ok", "", []),
    ("<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>", False,
     "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>", "", []),
    ("<think>r<tool_call>{\"arguments\": {\"z\": 2}, \"name\": \"h\"}</tool_call>", True, "", "r",
     [("h", {"z": 2})]),
]


def run(text: str, tools: bool, step: int) -> tuple[OutputParser, dict[int, list[Any]]]:
    p = OutputParser(parse_tools=tools, parse_reasoning=True)
    streamed: dict[int, list[Any]] = {}
    pieces = [text[i:i + step] for i in range(0, len(text), step)] + [""]
    for k, piece in enumerate(pieces):
        d = p.feed(piece, final=k == len(pieces) - 1)
        for idx, cid, name, args in d.tool_calls:
            slot = streamed.setdefault(idx, [None, None, ""])
            if cid is not None:
                slot[0], slot[1] = cid, name
            slot[2] += args
    return p, streamed


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("step", [1, 2, 5, 10_000])
def test_parser_any_chunking(case: Any, step: int) -> None:
    text, tools, content, reasoning, calls = case
    p, streamed = run(text, tools, step)
    assert p.content == content
    assert p.reasoning == reasoning
    final = p.final_calls()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in final] == calls
    assert [(s[1], json.loads(s[2])) for _, s in sorted(streamed.items())] == calls
    assert all(s[0] == c["id"] for s, c in zip(streamed.values(), final, strict=True))


def test_reasoning_started_in_prompt() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    p = OutputParser(parse_tools=True, parse_reasoning=True, starts_in_reasoning=True)
    p.feed("thinking...</think>answer", final=True)
    assert (p.reasoning, p.content) == ("thinking...", "answer")


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 30, "logprobs": True},
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "audio": {}}, "audio"),
    # An unknown field is ignored (with a warning); a known one of the wrong type is still a 400.
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1, "n": "many"}, "n"),
    ({"messages": [{"role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages"),
])
def test_chat_validation_names_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as e:
        parse(body, ChatCompletionRequest)
    assert e.value.status == 400
    assert (e.value.param or "").startswith(param)


def test_completion_rules() -> None:
    for bad in ({"prompt": "x", "suffix": "y"}, {"prompt": "x", "best_of": 3}, {"prompt": []}):
        with pytest.raises(APIError):
            parse(bad, CompletionRequest)
    assert parse({"prompt": [1, 2, 3]}, CompletionRequest).prompts() == [[1, 2, 3]]
    assert parse({"prompt": ["a", "b"], "user": "u"}, CompletionRequest).prompts() == ["a", "b"]


CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n' \
         '</tool_call>'
CALL_B = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "}{\\"<"}}\n</tool_call>'
PREFIX_OUTPUTS = [
    f"<think>\nplan it\n</think>\n\nLet me check. {CALL_A}\n{CALL_B}\n done.",
    'x <tool_call>{"name": "g", "arguments": {"q": "}"}}</tool_call>  tail ',
    '<think>r<tool_call>{"arguments": {"z": 2}, "name": "h"}</tool_call><tool_call>oops',
]


def outcome(text: str, step: int) -> tuple[str, str, list[Any], list[Any]]:
    """Feeds `text` in pieces of `step` characters, the last with final=True, as the server does
    (one piece: non-streaming). Returns content, reasoning, final calls and streamed calls."""
    p = OutputParser(parse_tools=True, parse_reasoning=True)
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
    # streamed arguments must be valid JSON whatever the cut (json.loads raises otherwise)
    sent = [(s[0], json.loads(s[1])) for _, s in sorted(streamed.items())]
    return p.content, p.reasoning, final, sent


@pytest.mark.parametrize("text", PREFIX_OUTPUTS)
def test_streaming_agrees_on_every_prefix(text: str) -> None:
    """Output cut anywhere (max_tokens): streaming in any chunking gives what non-streaming gives,
    a cut call is text (with no closing tag the model never wrote), never invalid JSON."""
    for n in range(len(text) + 1):
        prefix = text[:n]
        whole = outcome(prefix, max(n, 1))
        assert whole[2] == whole[3], prefix
        for step in (1, 3):
            assert outcome(prefix, step) == whole, (prefix, step)
        content = whole[0]
        assert content.count("</tool_call>") <= prefix.count("</tool_call>"), prefix
        opened = prefix.count("<tool_call>")
        # every opened block is either a call or text
        assert len(whole[2]) + content.count("<tool_call>") + whole[1].count("<tool_call>") \
            == opened, prefix
