"""The request of `POST /v1/responses` (OpenAI's Responses API), and its translation into a chat
completion request: the server answers it with the chat machinery (template, tool and reasoning
parsers), as llama-server and Ollama do. Stateless: nothing is stored between requests, so
`previous_response_id` and `conversation` are refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from spillover.server.protocol import (
    REQUEST_MODELS,
    APIError,
    ChatCompletionRequest,
    _Strict,
    parse,
)

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")


class InputPart(_Strict):
    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> InputPart:
        if self.type not in _TEXT_PARTS:
            raise ValueError(f"content part type {self.type!r} is not supported: this model "
                             "takes text only")
        return self

    def value(self) -> str:
        return self.text if self.text is not None else (self.refusal or "")


def _text(content: str | list[InputPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.value() for p in content)


class InputItem(_Strict):
    """A message (`type` may be left out), a function call the model made, its output, or a
    reasoning item sent back."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    summary: list[InputPart] | None = None

    @model_validator(mode="after")
    def _fields_of_type(self) -> InputItem:
        need = {"message": ("role",), "function_call": ("call_id", "name", "arguments"),
                "function_call_output": ("call_id", "output"), "reasoning": ()}[self.type]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs `{missing[0]}`")
        return self


class FunctionTool(_Strict):
    type: str
    name: str = Field(default="", max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _function_only(self) -> FunctionTool:
        if self.type != "function":
            raise ValueError(f"tool type {self.type!r} is not supported: only function tools")
        if not self.name:
            raise ValueError("a function tool needs a `name`")
        return self


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)


class Reasoning(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: str | None = None


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    stream_options: dict[str, Any] | None = None
    # Refused when set: this server keeps no state between requests and runs nothing later.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None

    @field_validator("previous_response_id", "conversation", "background")
    @classmethod
    def _stateless(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or v is False:
            return v
        if info.field_name == "background":
            raise ValueError("background responses are not supported")
        raise ValueError(f"{info.field_name} is not supported: this server stores no "
                         "responses; send the whole conversation in `input`")


# Published in /openapi.json beside the other bodies (protocol.py cannot import this module).
REQUEST_MODELS["/v1/responses"] = ResponsesRequest


def to_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """`instructions` + `input` as chat messages: consecutive function calls become one assistant
    turn with several tool_calls, their outputs tool messages, reasoning goes on the next
    assistant turn."""
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        msgs.append({"role": "user", "content": req.input})
        return msgs
    reasoning: str | None = None
    for item in req.input:
        if item.type == "reasoning":
            reasoning = _text(item.content) or "".join(p.value() for p in item.summary or [])
        elif item.type == "message":
            msgs.append({"role": item.role, "content": _text(item.content)})
            if item.role == "assistant" and reasoning is not None:
                msgs[-1]["reasoning_content"], reasoning = reasoning, None
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    msgs[-1]["reasoning_content"], reasoning = reasoning, None
        else:
            msgs.append({"role": "tool", "tool_call_id": item.call_id,
                         "content": item.output if isinstance(item.output, str)
                         else _text(item.output)})
    return msgs


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    messages = to_messages(req)
    if not messages:
        raise APIError(400, "input must not be empty", param="input")
    names = {t.name for t in req.tools or []}
    if req.tool_choice not in (None, "none") and not names:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(req.tool_choice, NamedFunction) and req.tool_choice.name not in names:
        raise APIError(400, f"tool_choice names {req.tool_choice.name!r}, which is not in tools",
                       param="tool_choice")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream,
                            "max_tokens": req.max_output_tokens, "temperature": req.temperature,
                            "top_p": req.top_p, "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(
            include={"name", "description", "parameters", "strict"}, exclude_none=True)}
            for t in req.tools]
    if isinstance(req.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format of type json_schema needs `schema`",
                           param="text.format.schema")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return parse({k: v for k, v in body.items() if v is not None}, ChatCompletionRequest)
