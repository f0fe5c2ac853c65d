"""The request models of chat completions, completions, /tokenize and /detokenize (pydantic): what a body may
hold, field by field (the rules they share: serving/openai/fields.py; the Responses API's request:
serving/openai/responses_request.py). Parse with serving.openai.parse.parse_request."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from serving.openai.fields import (MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_TOKEN_IDS, MAX_TOOLS, Id, LogitBias,
                                   MaxTokens, RequestBody, Seed, Stop, StopTokenIds, TokenIds, TopK, TopLogprobs,
                                   WireModel, bounded, field_error, vocab_of)
from serving.request import INT32_MAX, MAX_N


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class FunctionCall(WireModel):
    name: str
    arguments: str | dict[str, Any] = "{}"   # JSON text (OpenAI) or an object


class ToolCallIn(WireModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
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


class StreamOptions(WireModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's extra: with include_usage, usage in every chunk


# Fields of OpenAI's and vLLM's requests that change nothing in the output: accepted and dropped (docs/server.md).
NOOP_FIELDS = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                         "prompt_cache_retention", "request_id", "priority", "user"})


class _SamplingFields(RequestBody):
    """Sampling fields shared by chat and completions. Unknown fields are refused (a 400 naming the field), never
    dropped; NOOP_FIELDS change nothing in the output and are accepted."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    top_k: TopK | None = None
    min_p: float | None = bounded("min_p")
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = bounded("presence_penalty")
    frequency_penalty: float | None = bounded("frequency_penalty")
    repetition_penalty: float | None = bounded("repetition_penalty")   # vLLM's extra
    min_tokens: int | None = bounded("min_tokens")                     # vLLM's extra
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


class FunctionDef(WireModel):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(WireModel):
    type: Literal["function"]
    function: FunctionDef


class _NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: _NamedFunction


class JsonSchemaFormat(WireModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a json_schema object")
        return self


class StructuredOutputs(WireModel):
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
        top = vocab_of(info) or INT32_MAX + 1
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


class TokenizeRequest(RequestBody):
    prompt: str | None = None
    messages: Messages | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(RequestBody):
    tokens: TokenIds
    skip_special_tokens: bool = False

