"""The limits of a request (docs/server.md, "Limits") and the field rules every request model shares: the
annotated field types (ids, token ids, sampling values), the UTF-8 rule, and the base models.

Integers the engine packs into its int32 step arrays are bounded to int32; token ids to the vocabulary; counts and
lengths so that no request makes the server do unbounded work before the engine sees it (the body itself is
bounded by --max-request-bytes). Sampling value ranges have their one home in serving.request.RANGES.
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from serving.openai.errors import APIError, path_to_param
from serving.request import INT32_MAX, RANGES
from serving.turns import MAX_ID_LEN  # conversation_id, cache_salt, previous_response_id: 1..256 printable

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_MESSAGES = 4096            # messages of a chat request or /tokenize, input items of a response
MAX_CONTENT_PARTS = 256        # text parts of one message
MAX_STOP = 16                  # stop strings
MAX_STOP_CHARS = 1024          # characters of one stop string
MAX_STOP_TOKEN_IDS = 256       # stop_token_ids entries
MAX_TOP_LOGPROBS = RANGES["top_logprobs"].hi  # alternatives per token the engine computes (hybrid_jax.sampling)
MAX_TOKEN_IDS = 1 << 20        # token ids of a completion prompt or a /detokenize request
MAX_TOOLS = 128                # tools of a request, tool calls of a message
MAX_LOGIT_BIAS = 300           # logit_bias entries (OpenAI's bound)


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


def not_utf8(param: str | None) -> str:
    return (f"{param + ': ' if param else ''}strings must be valid UTF-8 text (a lone surrogate such as "
            "\\ud800 is not)")


def _printable(v: str) -> str:
    if not v.isprintable():
        raise ValueError("must be printable text (no control characters such as a newline)")
    return v


def vocab_of(info: ValidationInfo) -> int | None:
    """The served model's vocabulary size, from the validation context (serving.openai.parse.parse_request)."""
    ctx = info.context if info is not None else None
    v = ctx.get("vocab_size") if isinstance(ctx, dict) else None
    return int(v) if v else None


def _token_ids(ids: list[int], info: ValidationInfo) -> list[int]:
    vocab = vocab_of(info)
    if vocab is not None:
        for i, t in enumerate(ids):
            if t >= vocab:
                raise ValueError(f"[{i}] = {t} is not a token id of this model (ids are in [0, {vocab}))")
    return ids


def _top_k(v: int) -> int:
    if v == 0:
        raise ValueError(f"top_k must be -1 (disabled) or in {RANGES['top_k']}")
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


def _logit_bias(v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
    vocab = vocab_of(info) or INT32_MAX + 1
    for k, b in v.items():
        if not k.strip().isdigit() or int(k) >= vocab:
            raise ValueError(f"key {k[:20]!r} is not a token id of this model (ids are in [0, {vocab}))")
        if b not in RANGES["logit_bias"]:
            raise ValueError(f"bias {b} of token {k} is not in {RANGES['logit_bias']}")
    return v


def bounded(name: str, default=None):
    """An optional sampling field held to its range in serving.request.RANGES."""
    return Field(default, **RANGES[name].bounds())


# A printable identifier: conversation_id, cache_salt, previous_response_id.
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN), AfterValidator(_printable)]
TokenId = Annotated[int, Field(**RANGES["token_id"].bounds())]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS), AfterValidator(_token_ids)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS), AfterValidator(_token_ids)]
MaxTokens = Annotated[int, Field(**RANGES["max_tokens"].bounds())]
TopK = Annotated[int, Field(ge=-1, le=RANGES["top_k"].hi), AfterValidator(_top_k)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]      # the engine folds it to 32 bits
TopLogprobs = Annotated[int, Field(**RANGES["top_logprobs"].bounds())]
Stop = Annotated[str | list[str], AfterValidator(_stop)]
LogitBias = Annotated[dict[str, float], AfterValidator(_logit_bias)]


def check_id(value: str | None, param: str) -> str | None:
    """The rule of `Id` for values outside a body (path, query, header): a 400 naming `param` if broken."""
    if value is not None and (not value or len(value) > MAX_ID_LEN or not value.isprintable()):
        raise APIError(400, f"{param} must be 1 to {MAX_ID_LEN} printable characters (no control characters such "
                            "as a newline)", param=param, code="invalid_value")
    return value


class WireModel(BaseModel):
    """A part of a request: unknown fields are dropped, numbers are finite."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class RequestBody(WireModel):
    """A request body. Every string in it must be UTF-8 text: JSON bodies are checked by the parser (a lone
    surrogate escape is invalid JSON to it, see `parse_request`), Python objects (the batch job) here."""

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data, info: ValidationInfo):
        if info.mode == "python":
            path = find_surrogate(data)
            if path is not None:
                param = path_to_param(path)
                raise field_error(param or "", not_utf8(param))
        return data
