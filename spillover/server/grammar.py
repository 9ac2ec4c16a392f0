"""Constrained decoding with llguidance: `response_format` and forced tool calls become token masks.

llguidance was chosen over xgrammar because its wheel has no Python dependencies (xgrammar pulls in
torch and triton, which would fight the pinned CPU torch), it compiles JSON schemas lazily (no
per-schema warm-up), and it takes Lark grammars with inline `%json` for tool-call wrappers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import llguidance
import llguidance.hf
import torch

from spillover.server.parsers import TOOL_CLOSE, TOOL_OPEN, ToolFormat
from spillover.server.protocol import APIError, ResponseFormat, ToolDef

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

# Compact JSON: with free whitespace a small model happily spends its whole budget on blank lines.
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarCompiler:
    """Turns OpenAI request fields into llguidance grammars and per-request logits processors."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.eos = eos_token_ids[0] if eos_token_ids else int(tokenizer.eos_token_id)
        # Building the token trie walks the whole vocabulary: once per server, lazily (most requests
        # never need it).
        self._hf_tokenizer = tokenizer
        self._lltok: Any = None
        self._lock = threading.Lock()

    @property
    def lltok(self) -> Any:
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.hf.from_tokenizer(self._hf_tokenizer,
                                                           n_vocab=self.vocab_size,
                                                           eos_token=self.eos)
            return self._lltok

    def for_response_format(self, rf: ResponseFormat) -> str | None:
        if rf.type == "text":
            return None
        if rf.type == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, overrides=_JSON_OPTIONS)
            return self._checked(grammar, "response_format")
        assert rf.json_schema is not None and rf.json_schema.schema_ is not None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                rf.json_schema.schema_, overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise APIError(400, f"invalid JSON schema: {e}"[:500],
                           param="response_format.json_schema.schema",
                           code="invalid_schema") from None
        return self._checked(grammar, "response_format.json_schema.schema")

    def for_tools(self, tools: list[ToolDef], only: str | None, parallel: bool,
                  tool_format: ToolFormat = "hermes") -> str:
        """Grammar for `tool_choice` required (any tool) or named (`only`), in the format the
        template teaches: hermes JSON blocks, or Qwen3-Coder XML calls."""
        if tool_format == "qwen3_xml":
            return self._checked(llguidance.LLMatcher.grammar_from_lark(
                xml_tools_lark(tools, only, parallel)), "tools")
        options = []
        for t in tools:
            if only is not None and t.function.name != only:
                continue
            params = t.function.parameters or {"type": "object"}
            options.append({"type": "object", "properties": {"name": {"const": t.function.name},
                                                             "arguments": params},
                            "required": ["name", "arguments"], "additionalProperties": False})
        schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
        schema = {**schema, "x-guidance": _JSON_OPTIONS}
        nl = json.dumps("\n")
        call = (f"{json.dumps(TOOL_OPEN + chr(10))} %json {json.dumps(schema)} "
                f"{json.dumps(chr(10) + TOOL_CLOSE)}")
        more = f" ({nl} call)*" if parallel else ""
        lark = f"start: call{more}\ncall: {call}\n"
        return self._checked(llguidance.LLMatcher.grammar_from_lark(lark), "tools")

    def _checked(self, grammar: str, param: str) -> str:
        err = llguidance.LLMatcher.validate_grammar(grammar, self.lltok)
        if err and not err.startswith("WARNING"):
            raise APIError(400, f"cannot enforce {param}: {err}"[:500], param=param,
                           code="invalid_schema")
        return grammar

    def processor(self, grammar: str) -> LogitsProcessor:
        return GrammarProcessor(self.lltok, grammar, self.eos, self.vocab_size)


class GrammarProcessor:
    """Masks the logits of one request to what its grammar allows; forces EOS once it is complete.

    The engine calls it per row with that row's output ids so far. With n > 1 the rows of one
    request share the processor, so matchers are kept per output prefix and forked on demand.
    """

    _MAX_STATES = 64

    def __init__(self, lltok: Any, grammar: str, eos: int, vocab_size: int) -> None:
        self._lltok, self._eos, self._vocab = lltok, eos, vocab_size
        root = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if root.is_error():
            raise APIError(400, f"grammar error: {root.get_error()}"[:500], code="invalid_schema")
        self._states: dict[tuple[int, ...], Any] = {(): root}
        self._lock = threading.Lock()

    def _matcher_for(self, ids: tuple[int, ...]) -> Any:
        m = self._states.get(ids)
        if m is not None:
            return m
        # Longest known prefix, copied (a sibling choice may still need it), then advanced.
        k = len(ids)
        while k > 0 and ids[:k] not in self._states:
            k -= 1
        m = self._states[ids[:k]].deep_copy()
        for tok in ids[k:]:
            if tok == self._eos or m.is_stopped():
                break
            m.consume_token(tok)
        self._states[ids] = m
        if len(self._states) > self._MAX_STATES:  # keep the most advanced states only
            for key in sorted(self._states, key=len)[: len(self._states) - self._MAX_STATES]:
                del self._states[key]
        return m

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        with self._lock:
            m = self._matcher_for(tuple(output_ids))
            if m.is_stopped() or m.is_error():
                allowed = torch.zeros(self._vocab, dtype=torch.bool)
                allowed[self._eos] = True
            else:
                bits = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.uint8)
                allowed = _unpack_bits(bits)[: self._vocab]
        n = min(logits.shape[-1], allowed.numel())
        out = logits.clone()
        out[:n] = torch.where(allowed[:n], logits[:n],
                              torch.tensor(float("-inf"), dtype=logits.dtype))
        out[n:] = float("-inf")
        return out


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    # llguidance packs token i into bit (i % 32) of 32-bit word i // 32, little-endian bytes,
    # which is bit (i % 8) of byte i // 8.
    return ((bits.unsqueeze(1) >> _SHIFTS) & 1).bool().reshape(-1)


# The end of an XML parameter, spelled as a regex inside a terminal. Values are lexed together
# with it: llguidance's lexer is greedy, and a free-text terminal followed by a separate
# "\n</parameter>" terminal would swallow the newline and never let go.
_PARAM_END = r"\n<\/parameter>\n"
_TYPED_VALUE = {
    "integer": r"-?(0|[1-9][0-9]*)",
    "number": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "boolean": r"(true|false)",
}


def xml_tools_lark(tools: list[ToolDef], only: str | None, parallel: bool) -> str:
    """A Lark grammar of Qwen3-Coder XML calls to `tools` (or the one named `only`): each call
    names a declared function and writes its parameters in schema order, the required ones
    always; numbers and booleans as such, objects and arrays as JSON of their schema, and
    anything else as text holding no `</parameter>`."""
    rules = ['TEXT_VALUE: /(?s:.*)/ & ~/(?s:.*<\\/parameter>.*)/',
             f'STR_END: TEXT_VALUE /{_PARAM_END}/']
    calls = []
    for i, t in enumerate(x for x in tools if only is None or x.function.name == only):
        schema = t.function.parameters or {}
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        parts = []
        for j, (pname, pschema) in enumerate(props.items()):
            kind = pschema.get("type") if isinstance(pschema, dict) else None
            if kind in _TYPED_VALUE:
                value = f"/{_TYPED_VALUE[kind]}{_PARAM_END}/"
            elif kind in ("object", "array"):
                value = f'%json {json.dumps({**pschema, "x-guidance": _JSON_OPTIONS})} ' \
                        f'"\\n</parameter>\\n"'
            else:
                value = "STR_END"
            rules.append(f"p{i}_{j}: {json.dumps(f'<parameter={pname}>' + chr(10))} {value}")
            parts.append(f"p{i}_{j}" + ("" if pname in required else "?"))
        head = json.dumps(f"{TOOL_OPEN}\n<function={t.function.name}>\n")
        tail = json.dumps(f"</function>\n{TOOL_CLOSE}")
        rules.append(f"call{i}: {head} {' '.join(parts)} {tail}")
        calls.append(f"call{i}")
    more = ' ("\\n" call)*' if parallel else ""
    return "\n".join([f"start: call{more}", f"call: {' | '.join(calls)}", *rules]) + "\n"
