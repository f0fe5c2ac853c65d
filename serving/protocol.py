"""The OpenAI wire protocol: request models (pydantic), the limits they enforce, the error type, and logprob
formatting.

This is the one place where a request is validated, for every route of the HTTP app (`serving.api`) and for the
batch job (`serving.batch`): a request that passes it holds only values the engine can hold (docs/server.md,
"Limits"). Parse with `parse_request(Model, body, vocab_size=...)`: the vocabulary size reaches the validators
through pydantic's validation context, so token ids are checked against the served model.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal

import jinja2
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from hybrid_jax.sampling import NUM_TOP_LOGPROBS
from serving import openai_format
from serving.errors import EngineError
from serving.request import INT32_MAX, MAX_N
from serving.turns import MAX_ID_LEN  # conversation_id, cache_salt, previous_response_id: 1..256 printable

log = logging.getLogger("serving.protocol")

# --------------------------------------------------------------------------------------------------
# Limits (docs/server.md, "Limits"): what a request may hold. Integers the engine packs into its int32 step
# arrays are bounded to int32; token ids to the vocabulary; counts and lengths so that no request makes the
# server do unbounded work before the engine sees it (the body itself is bounded by --max-request-bytes).
# --------------------------------------------------------------------------------------------------

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_MESSAGES = 4096            # messages of a chat request or /tokenize, input items of a response
MAX_CONTENT_PARTS = 256        # text parts of one message
MAX_STOP = 16                  # stop strings
MAX_STOP_CHARS = 1024          # characters of one stop string
MAX_STOP_TOKEN_IDS = 256       # stop_token_ids entries
MAX_TOP_LOGPROBS = NUM_TOP_LOGPROBS  # alternatives per token the engine computes (hybrid_jax.sampling)
MAX_TOKEN_IDS = 1 << 20        # token ids of a completion prompt or a /detokenize request
MAX_TOOLS = 128                # tools of a request, tool calls of a message
MAX_LOGIT_BIAS = 300           # logit_bias entries (OpenAI's bound)

LIMITS = dict(int32_max=INT32_MAX, max_id_len=MAX_ID_LEN, max_messages=MAX_MESSAGES,
              max_content_parts=MAX_CONTENT_PARTS, max_stop=MAX_STOP, max_stop_chars=MAX_STOP_CHARS,
              max_stop_token_ids=MAX_STOP_TOKEN_IDS, max_top_logprobs=MAX_TOP_LOGPROBS,
              max_token_ids=MAX_TOKEN_IDS, max_tools=MAX_TOOLS, max_logit_bias=MAX_LOGIT_BIAS, max_n=MAX_N)


class APIError(Exception):
    """Raised inside the app; turned into an OpenAI error response."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or openai_format.error_type(status)


openai_error = openai_format.error_body  # {"error": {"message", "type", "param", "code"}}


def as_api_error(exc: BaseException) -> APIError:
    """The OpenAI error for any exception: engine errors keep their status, type, param and code."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineError):
        return APIError(exc.status, exc.message, type=exc.type if exc.status != 500 else None, param=exc.param,
                        code=exc.code)
    if isinstance(exc, jinja2.TemplateError):
        return APIError(400, f"the chat template rejected the messages: {exc}", param="messages")
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error")


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|[\w-]+\[.*\])$")


def loc_to_param(loc) -> str | None:
    # Drop the location prefix and pydantic's union-branch tags ("str", "list[TextPart]", "function-after[...]").
    parts = [p for p in loc if p not in ("body", "query", "path", "header")
             and not (isinstance(p, str) and _UNION_TAG.match(p))]
    return path_to_param(parts)


def path_to_param(parts) -> str | None:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


# --------------------------------------------------------------------------------------------------
# Field rules, shared by every request model
# --------------------------------------------------------------------------------------------------

def field_error(param: str, message: str) -> PydanticCustomError:
    """A validation error that names its field (for checks that see the whole request)."""
    return PydanticCustomError("invalid_field", message, {"param": param})


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def find_surrogate(obj) -> tuple | None:
    """The path of the first string holding a lone surrogate (which is not UTF-8 text), or None; for a key that
    holds one, the path of its object (a path never holds the bad text itself)."""
    stack = [((), obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path
        elif isinstance(v, dict):
            if any(isinstance(k, str) and _SURROGATE.search(k) for k in v):
                return path
            for k, x in reversed(list(v.items())):
                stack.append((path + (k,), x))
        elif isinstance(v, (list, tuple)):
            stack.extend((path + (i,), x) for i, x in reversed(list(enumerate(v))))
    return None


def _not_utf8(param: str | None) -> str:
    return (f"{param + ': ' if param else ''}strings must be valid UTF-8 text (a lone surrogate such as "
            "\\ud800 is not)")


def _printable(v: str) -> str:
    if not v.isprintable():
        raise ValueError("must be printable text (no control characters such as a newline)")
    return v


def _vocab(info: ValidationInfo) -> int | None:
    ctx = info.context if info is not None else None
    v = ctx.get("vocab_size") if isinstance(ctx, dict) else None
    return int(v) if v else None


def _token_ids(ids: list[int], info: ValidationInfo) -> list[int]:
    vocab = _vocab(info)
    if vocab is not None:
        for i, t in enumerate(ids):
            if t >= vocab:
                raise ValueError(f"[{i}] = {t} is not a token id of this model (ids are in [0, {vocab}))")
    return ids


def _top_k(v: int) -> int:
    if v == 0:
        raise ValueError(f"top_k must be -1 (disabled) or in [1, {INT32_MAX}]")
    return v


def _stop(v):
    items = [v] if isinstance(v, str) else v
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    for s in items:
        if not s:
            raise ValueError("stop sequences must be non-empty strings")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
    return v


# A printable identifier: conversation_id, cache_salt, previous_response_id.
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN), AfterValidator(_printable)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS), AfterValidator(_token_ids)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS), AfterValidator(_token_ids)]
MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
TopK = Annotated[int, Field(ge=-1, le=INT32_MAX), AfterValidator(_top_k)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]      # the engine folds it to 32 bits
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Stop = Annotated[str | list[str], AfterValidator(_stop)]


def check_id(value: str | None, param: str) -> str | None:
    """The rule of `Id` for values outside a body (path, query, header): a 400 naming `param` if broken."""
    if value is not None and (not value or len(value) > MAX_ID_LEN or not value.isprintable()):
        raise APIError(400, f"{param} must be 1 to {MAX_ID_LEN} printable characters (no control characters such "
                            "as a newline)", param=param, code="invalid_value")
    return value


# --------------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Request(_Model):
    """A request body. Every string in it must be UTF-8 text: JSON bodies are checked by the parser (a lone
    surrogate escape is invalid JSON to it, see `parse_request`), Python objects (the batch job) here."""

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data, info: ValidationInfo):
        if info.mode == "python":
            path = find_surrogate(data)
            if path is not None:
                param = path_to_param(path)
                raise field_error(param or "", _not_utf8(param))
        return data


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"   # JSON text (OpenAI) or an object


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=MAX_TOOLS)] | None = None   # assistant
    tool_call_id: str | None = None                                                      # tool
    reasoning_content: str | None = None                                                 # assistant

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role {self.role!r}")
        return self

    def to_engine(self) -> dict:
        """The message as the engine takes it (serving.turns.validate_messages gives it its one form)."""
        out = self.model_dump(exclude_none=True, include={"role", "content", "name", "tool_calls", "tool_call_id",
                                                          "reasoning_content"})
        if isinstance(self.content, list):
            out["content"] = "".join(p.text for p in self.content)
        return out


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class StreamOptions(_Model):
    include_usage: bool = False


def _logit_bias(v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
    vocab = _vocab(info) or INT32_MAX + 1
    for k, b in v.items():
        if not k.strip().isdigit() or int(k) >= vocab:
            raise ValueError(f"key {k[:20]!r} is not a token id of this model (ids are in [0, {vocab}))")
        if not -100.0 <= b <= 100.0:
            raise ValueError(f"bias {b} of token {k} is not in [-100, 100]")
    return v


LogitBias = Annotated[dict[str, float], AfterValidator(_logit_bias)]

# Fields of OpenAI's and vLLM's requests that change nothing in the output: accepted and dropped (docs/server.md).
NOOP_FIELDS = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                         "prompt_cache_retention", "request_id", "priority", "user"})


class _SamplingFields(_Request):
    """Sampling fields shared by chat and completions. Unknown fields are refused (a 400 naming the field), never
    dropped; NOOP_FIELDS change nothing in the output and are accepted."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: TopK | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)     # vLLM's extra
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)           # vLLM's extra
    logit_bias: LogitBias | None = None

    @model_validator(mode="before")
    @classmethod
    def _noop(cls, data):
        if isinstance(data, dict) and NOOP_FIELDS & data.keys():
            data = {k: v for k, v in data.items() if k not in NOOP_FIELDS}
        return data

    @model_validator(mode="after")
    def _min_tokens(self):
        top = getattr(self, "max_completion_tokens", None) or self.max_tokens
        if self.min_tokens and top and self.min_tokens > top:
            raise field_error("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({top})")
        return self

    def sampling(self, max_tokens: int | None) -> dict:
        """The engine's sampling arguments; a field left out takes the server's default (--generation-config)."""
        kw = dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                  min_p=self.min_p, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                  ignore_eos=self.ignore_eos or None, presence_penalty=self.presence_penalty,
                  frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                  min_tokens=self.min_tokens, logit_bias=self.logit_bias or None)
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionDef(_Model):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class _NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: _NamedFunction


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a json_schema object")
        return self


class StructuredOutputs(_Model):
    """vLLM's `structured_outputs` (its older `guided_*` fields map onto it): exactly one constraint."""
    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=4096)] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: Messages
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    conversation_id: Id | None = None
    cache_salt: Id | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None      # accepted; a forced call (required, named) is one call when False
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None            # vLLM's: variables of the chat template
    structured_outputs: StructuredOutputs | None = None           # vLLM's
    guided_json: dict[str, Any] | str | None = None               # vLLM's older names of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs and not self.logprobs:
            raise field_error("top_logprobs", "top_logprobs requires logprobs=true")
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if choice not in (None, "none") and not names:
            raise field_error("tool_choice", "tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise field_error("tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools")
        if len(set(names)) != len(names):
            raise field_error("tools", "tool names must be unique")
        given = [k for k in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, k) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if self.tool_choice_mode in ("required", "named"):
            given.append("tool_choice")
        if len(given) > 1:
            raise field_error(given[1], f"{' and '.join(given)} cannot be combined: give one constraint")
        return self

    @property
    def tool_choice_mode(self) -> str:
        """none, auto, required or named (auto when tools are given without a choice, as OpenAI does)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    def structured(self) -> StructuredOutputs | None:
        """The output constraint other than a tool call, in vLLM's structured_outputs form."""
        if self.structured_outputs is not None:
            return self.structured_outputs
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return StructuredOutputs(json_object=True)
        if rf is not None and rf.type == "json_schema":
            return StructuredOutputs(json=rf.json_schema.schema_ or {"type": "object"})
        for field, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, field) is not None:
                return StructuredOutputs(**{key: getattr(self, field)})
        return None


class CompletionRequest(_SamplingFields):
    # A string, a list of token ids, or a list holding one of them; checked by _prompt (clear messages, token
    # ids against the vocabulary), then a string or a list of token ids.
    prompt: Any
    max_tokens: MaxTokens | None = 16
    logprobs: TopLogprobs | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    conversation_id: Id | None = None   # the prompt continues this conversation's committed tokens
    cache_salt: Id | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return v
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise ValueError("prompt must be a string or a list of token ids")
        if not v:
            raise ValueError("prompt must not be empty")
        if len(v) > MAX_TOKEN_IDS:
            raise ValueError(f"at most {MAX_TOKEN_IDS} token ids")
        top = _vocab(info) or INT32_MAX + 1
        for i, t in enumerate(v):
            if not 0 <= t < top:
                raise ValueError(f"[{i}] = {t} is not a token id of this model (ids are in [0, {top}))")
        return v

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.n != 1:
            raise field_error("n", "n > 1 is served by /v1/chat/completions only")
        if self.echo:
            raise field_error("echo", "echo is not supported")
        if self.suffix:
            raise field_error("suffix", "suffix is not supported")
        if self.best_of not in (None, 1):
            raise field_error("best_of", "only best_of=1 is supported")
        return self


class TokenizeRequest(_Request):
    prompt: str | None = None
    messages: Messages | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    tokens: TokenIds
    skip_special_tokens: bool = False


# --------------------------------------------------------------------------------------------------
# The Responses API request (`POST /v1/responses`, serving/api/responses.py)
# --------------------------------------------------------------------------------------------------

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_NOOP_INCLUDES = {"reasoning.encrypted_content"}  # this server never returns reasoning items

# Fields of OpenAI's request that this server refuses, with the reason (everything else unknown is refused too).
_REFUSED = {
    "conversation": "the conversation field is not supported; continue with previous_response_id",
    "prompt": "prompt templates (the prompt field) are not supported",
    "context_management": "context_management is not supported",
    "prompt_cache_options": "prompt_cache_options is not supported",
    "moderation": "moderation is not supported",
    "image": "image generation options are not supported",
    "background_options": "background responses are not supported",
    "access_programs": "access_programs is not supported",
    "max_tokens": "use max_output_tokens",
    "conversation_id": "conversation_id is not a Responses API field; continue with previous_response_id",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _StreamOptions(_Strict):
    include_obfuscation: bool | None = None  # accepted; this server never pads events


class ResponsesRequest(_Request):
    """`POST /v1/responses` body. Unknown fields are refused (400), never silently ignored."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    input: str | Annotated[list[Any], Field(max_length=MAX_MESSAGES)]   # items checked by input_messages
    instructions: str | None = None
    previous_response_id: Id | None = None
    store: bool | None = True
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: TopLogprobs | None = None
    include: list[str] | None = None
    # accepted, no effect on the output (echoed where OpenAI echoes them)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=0, le=INT32_MAX)
    # accepted only with the values that change nothing
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    # this server's extras (as in chat completions)
    cache_salt: Id | None = None
    top_k: TopK | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data):
        if isinstance(data, dict):
            for name in data:
                if name in _REFUSED and data[name] is not None:
                    raise field_error(name, f"{name}: {_REFUSED[name]}")
            data = {k: v for k, v in data.items() if k not in _REFUSED}  # the rest are null: nothing asked
        return data

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 metadata pairs")
            if any(len(k) > 64 or len(x) > 512 for k, x in v.items()):
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tools:
            raise field_error("tools", "tools are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise field_error("tool_choice", "tool_choice: only 'none' and 'auto' are supported (no tools)")
        if self.text is not None:
            extra = set(self.text) - {"format", "verbosity"}
            if extra:
                raise field_error(f"text.{sorted(extra)[0]}", f"text.{sorted(extra)[0]} is not supported")
            fmt = self.text.get("format")
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
                raise field_error("text.format", "text.format: only {'type': 'text'} is supported")
            if self.text.get("verbosity") not in (None, "medium"):
                raise field_error("text.verbosity", "text.verbosity: only 'medium' is supported")
        if self.reasoning is not None:
            for k, v in self.reasoning.items():
                if v is not None and not (k == "effort" and v == "none"):
                    raise field_error(f"reasoning.{k}",
                                      f"reasoning.{k} is not supported (this server returns no reasoning)")
        if self.truncation == "auto":
            raise field_error("truncation",
                              "truncation 'auto' is not supported: a prompt longer than the context is refused")
        if self.background:
            raise field_error("background", "background responses are not supported")
        for i, inc in enumerate(self.include or []):
            if inc != LOGPROBS_INCLUDE and inc not in _NOOP_INCLUDES:
                raise field_error(f"include[{i}]", f"include {inc!r} is not supported")
        if self.top_logprobs and not self.want_logprobs:
            raise field_error("top_logprobs", f"top_logprobs requires include=[{LOGPROBS_INCLUDE!r}]")
        return self

    @property
    def want_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def sampling(self) -> dict:
        kw = dict(max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p,
                  top_k=self.top_k, min_p=self.min_p, seed=self.seed, stop=self.stop,
                  stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos or None)
        if self.want_logprobs:
            kw.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        return {k: v for k, v in kw.items() if v is not None}


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

def engine_vocab_size(engine) -> int:
    """The vocabulary the engine's model embeds (token ids are in [0, this))."""
    cfg = getattr(engine, "cfg", None)
    v = getattr(cfg, "vocab_size", None) or getattr(getattr(engine, "tokenizer", None), "vocab_size", 0)
    return int(v or 0)


def parse_request(model: type[BaseModel], body: bytes | str | Any, *, vocab_size: int | None = None):
    """Validate a request body, JSON text or an already parsed object (the batch job), into `model`; raises
    APIError(400) naming the first bad field. `vocab_size` bounds token ids (the served model's)."""
    context = {"vocab_size": vocab_size}
    try:
        if isinstance(body, (bytes, bytearray, str)):
            return model.model_validate_json(body, context=context)
        return model.model_validate(body, context=context)
    except ValidationError as e:
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            raise _json_error(body) from None
        raise validation_error(errors) from None


def _json_error(body) -> APIError:
    """Why a body is not JSON to the parser: text that Python's lenient json reads holds a lone surrogate escape
    (not UTF-8 text) somewhere, which is named; anything else is not JSON at all."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    path = find_surrogate(obj)
    if path is None:
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    param = path_to_param(path)
    return APIError(400, _not_utf8(param), param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------------
# Logprobs
# --------------------------------------------------------------------------------------------------

def _top_entries(tl) -> list[tuple[int | None, str | None, float]]:
    """The alternatives of a TokenLogprob as (id, text, logprob), whatever shape the engine uses."""
    top = getattr(tl, "top", None)
    if top is None:
        top = getattr(tl, "top_logprobs", None)
    out = []
    if isinstance(top, dict):
        top = list(top.items())
    for e in top or []:
        if isinstance(e, (tuple, list)):
            if len(e) == 3:
                out.append((e[0], e[1], float(e[2])))
            elif len(e) == 2:
                a, b = e
                out.append((a, None, float(b)) if isinstance(a, int) else (None, str(a), float(b)))
        else:
            out.append((getattr(e, "token_id", None), getattr(e, "token", None), float(getattr(e, "logprob"))))
    return out


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.byte_level = type(tokenizer).__name__ == "ByteTokenizer"

    def text(self, tid: int | None, text: str | None) -> str:
        if text is not None:
            return text
        if tid is None:
            return ""
        return self.tok.decode([int(tid)], skip_special_tokens=False)

    def bytes(self, tid: int | None, text: str) -> list[int]:
        if self.byte_level and tid is not None and 0 <= int(tid) < 256:
            return [int(tid)]
        return list(text.encode("utf-8", errors="replace"))

    def chat(self, tls) -> list[dict]:
        out = []
        for tl in tls:
            tid = getattr(tl, "token_id", None)
            s = self.text(tid, getattr(tl, "token", None))
            tops = []
            for a, b, lp in _top_entries(tl):
                t = self.text(a, b)
                tops.append({"token": t, "logprob": lp, "bytes": self.bytes(a, t)})
            out.append({"token": s, "logprob": float(tl.logprob), "bytes": self.bytes(tid, s), "top_logprobs": tops})
        return out

    def completion(self, tls, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tl in tls:
            s = self.text(getattr(tl, "token_id", None), getattr(tl, "token", None))
            tokens.append(s)
            lps.append(float(tl.logprob))
            tops.append({self.text(a, b): lp for a, b, lp in _top_entries(tl)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def validation_error(errors: list[dict]) -> APIError:
    """The 400 for pydantic validation errors: the first error's field and message, and how many more."""
    first = errors[0] if errors else {}
    param = (first.get("ctx") or {}).get("param") or loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid request")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first.get("type") == "json_invalid":
        msg, param = "the request body is not valid JSON", None
    elif first.get("type") == "missing":
        msg = f"missing required field: {param}"
    elif first.get("type") == "extra_forbidden":
        msg = f"{param}: unsupported field (fields this server does not implement are refused, not ignored)"
    elif first.get("type") == "invalid_field" or not param or msg.startswith(param):
        pass
    else:
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, msg, param=param, code="invalid_value")
