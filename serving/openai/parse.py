"""Parsing a request body into its model: `parse_request(Model, body, vocab_size=...)`, for every route of the
HTTP app (`serving.openai.api`) and for the batch job (`serving.batch`). The vocabulary size reaches the validators
through pydantic's validation context, so token ids are checked against the served model."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from serving.openai.errors import APIError, path_to_param, validation_error
from serving.openai.fields import find_surrogate, not_utf8


def engine_vocab_size(engine) -> int:
    """The vocabulary the engine's model embeds (token ids are in [0, this))."""
    cfg = getattr(engine, "cfg", None)
    v = getattr(cfg, "vocab_size", None) or getattr(getattr(engine, "tokenizer", None), "vocab_size", 0)
    return int(v or 0)


def served_names(engine, served_model_name: str | None) -> tuple[str, set]:
    """The name answers carry (`--served-model-name`, else the engine's) and the names a request may give."""
    name = served_model_name or getattr(engine, "model_name", None) or "default"
    return name, {name, getattr(engine, "model_name", name)}


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
    return APIError(400, not_utf8(param), param=param, code="invalid_value")

