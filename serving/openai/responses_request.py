"""The Responses API request (`POST /v1/responses`, serving/openai/api/responses.py): the fields it supports, those that
change nothing in the output (accepted), and those refused with 400 (a field that would change the output is never
ignored)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.openai.fields import (MAX_MESSAGES, Id, MaxTokens, RequestBody, Seed, Stop, StopTokenIds, TopK,
                                   TopLogprobs, bounded, field_error)
from serving.request import INT32_MAX

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


class ResponsesRequest(RequestBody):
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
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
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
    min_p: float | None = bounded("min_p")
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

