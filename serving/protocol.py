"""The OpenAI wire protocol: request models (pydantic), the error type, and logprob formatting.

Shared by the HTTP app (`serving.app`) and the batch job (`serving.batch`), so both validate and answer alike.
"""
from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from serving import openai_format
from serving.errors import EngineError

log = logging.getLogger("serving.protocol")

MAX_ID_LEN = 256


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
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


# --------------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------------

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role {self.role!r}")
        return self

    def to_engine(self) -> dict:
        content: Any = self.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Model):
    include_usage: bool = False


class _SamplingFields(_Model):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v is not None and v != -1 and v < 1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif v == "":
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def sampling(self, max_tokens: int | None) -> dict:
        kw = dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                  min_p=self.min_p, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                  ignore_eos=self.ignore_eos or None)
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    conversation_id: Id | None = None
    cache_salt: Id | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("only response_format type 'text' is supported")
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    conversation_id: Id | None = None   # the prompt continues this conversation's committed tokens
    cache_salt: Id | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported")
                v = v[0]
        if isinstance(v, list) and not v or v == "":
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return self


class TokenizeRequest(_Model):
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Model):
    tokens: list[int]
    skip_special_tokens: bool = False


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
    param = loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg, param = "the request body is not valid JSON", None
    elif first.get("type") == "missing":
        msg = f"missing required field: {param}"
    else:
        msg = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, msg, param=param, code="invalid_value")
