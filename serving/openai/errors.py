"""The OpenAI error: the exception the app raises (`APIError`), its body (`openai_error`), how any exception
or pydantic validation error becomes one (`as_api_error`, `validation_error`), and the errors the server and the
batch job share (`check_model`: a request naming another model; `finish_error`: a result ended in error)."""
from __future__ import annotations

import logging
import re

import jinja2

from serving.errors import EngineError
from serving.openai import bodies

log = logging.getLogger("serving.openai")


class APIError(Exception):
    """Raised inside the app; turned into an OpenAI error response."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or bodies.error_type(status)


openai_error = bodies.error_body  # {"error": {"message", "type", "param", "code"}}


def check_model(name: str | None, accepted: set, served: str) -> None:
    """404 for a request naming a model other than the served one (`accepted`: the names it answers to)."""
    if name and name not in accepted:
        shown = name if len(name) <= 200 else name[:200] + "..."
        raise APIError(404, f"the model {shown!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def finish_error(result) -> APIError | None:
    """The error a result that ended in error or abort is answered with (None for a finished one)."""
    if result.finish_reason == "error":
        return APIError(500, f"generation failed: {getattr(result, 'error', None) or 'engine error'}",
                        code="generation_error")
    if result.finish_reason == "abort":
        return APIError(503, "the request was aborted", code="aborted")
    return None


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
