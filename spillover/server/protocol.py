"""Pydantic request types of the OpenAI API and the error envelope.

Requests are validated here and nowhere else; responses are plain dicts built in serving.py because
streaming writes one JSON object per token and pydantic would only add cost there.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("spillover.server")

# Fields OpenAI clients send that change nothing for a single local model: accepted and ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "safety_identifier", "verbosity"})

# Fields that exist in the OpenAI API but that this server cannot honour: a clear 400 beats silence.
UNSUPPORTED_FIELDS = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated `functions` field is not supported; use `tools`",
    "function_call": "the deprecated `function_call` field is not supported; use `tool_choice`",
}


class APIError(Exception):
    """An error that goes to the client in OpenAI's envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code = param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    # Unknown top-level fields are ignored with a warning by `check_fields` (vLLM's behaviour).
    model_config = ConfigDict(extra="allow")


# ---- messages ------------------------------------------------------------------------------------

class ContentPart(_Strict):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in ("text", "input_text"):
            raise ValueError(f"content part type {self.type!r} is not supported: this "
                             "model takes text only")
        if self.text is None:
            raise ValueError("a text content part needs `text`")
        return self


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def _has_name(cls, v: dict[str, str]) -> dict[str, str]:
        if not v.get("name"):
            raise ValueError("tool_choice.function needs a `name`")
        return v


class JsonSchemaSpec(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        missing = self.json_schema is None or self.json_schema.schema_ is None
        if self.type == "json_schema" and missing:
            raise ValueError("response_format type json_schema needs json_schema.schema")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# ---- shared sampling fields ----------------------------------------------------------------------

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# OpenAI's seed is an int64 (torch's generator would take up to 2**64 - 1, but no more).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_SEQUENCES = 16  # OpenAI takes 4; vLLM any number
MAX_STOP_CHARS = 1024  # each stop string is searched for after every token


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for s in [v] if isinstance(v, str) else v or []:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.tools is not None and len(self.tools) == 0:
            raise ValueError("tools must not be empty; leave it out instead")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            name = self.tool_choice.function["name"]
            if name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
        return self

    def limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _completion_rules(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def check_fields(body: dict[str, Any], model: type[BaseModel]) -> None:
    """400 for fields we know but cannot honour; fields no OpenAI server knows are ignored with a
    warning naming them (vLLM's behaviour: a client's extension field must not break it)."""
    unknown: list[str] = []
    for key in body:
        if key in UNSUPPORTED_FIELDS:
            raise APIError(400, f"`{key}`: {UNSUPPORTED_FIELDS[key]}", param=key,
                           code="unsupported_parameter")
        if key not in model.model_fields and key not in IGNORED_FIELDS:
            unknown.append(key)
    for key in unknown:
        del body[key]
    if unknown:
        names = ", ".join(repr(k[:64]) for k in unknown[:16])
        more = f" (and {len(unknown) - 16} more)" if len(unknown) > 16 else ""
        log.warning("%s: ignoring unknown request fields: %s%s", model.__name__, names, more)


def parse(body: Any, model: type[BaseModel]) -> Any:
    """Validates a decoded JSON body into `model`, turning every problem into a 400 with `param`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_fields(body, model)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ())
                         if not str(x).startswith("function-after"))
        msg = str(err.get("msg", "invalid value"))
        # Keep messages short: echoing the offending input can make error bodies huge.
        raise APIError(400, f"{param or 'body'}: {msg}"[:500], param=param or None,
                       code="invalid_value") from None


# ---- /openapi.json -------------------------------------------------------------------------------

# The bodies are parsed by hand (`parse`), so FastAPI cannot see them: published explicitly.
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
_REF = "#/components/schemas/{model}"


def openapi_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model` (its schema in `request_schemas`)."""
    ref = _REF.format(model=model.__name__)
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": ref}}}}}


def request_schemas() -> dict[str, Any]:
    """The JSON schemas of the request models and of the models they use, for
    `components.schemas` of /openapi.json."""
    out: dict[str, Any] = {}
    for model in REQUEST_MODELS.values():
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
