"""OpenAI wire objects built from engine results, shared by the server (`serving.app`) and the offline batch
(`serving.batch`), so both answer with the same bodies.

* `chat_completion(choices, results, ...)`: the non-streamed `chat.completion` object;
* `usage(result)`, `usage_of_choices(results)`: `usage` blocks (with `prompt_tokens_details.cached_tokens`);
  `running_usage(prompt, completion)`: a streamed chunk's block while the answer grows;
* `error_body(...)`: OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.

Only plain dicts, no web framework: importing this module is cheap.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

__all__ = ["ERROR_TYPES", "chat_completion", "completion_id", "error_body", "error_type", "running_usage", "usage",
           "usage_of_choices"]

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, *, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body, as the server answers it with HTTP status `status`."""
    return {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage block of a streamed chunk while the answer grows (stream_options.continuous_usage_stats)."""
    p, c = int(prompt_tokens), int(completion_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return dict(running_usage(prompt_tokens, completion_tokens),
                prompt_tokens_details={"cached_tokens": int(cached_tokens)})


def usage(result) -> dict:
    """The usage block of a ChatResult (prompt, completion, total and cached prompt tokens)."""
    return _usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)


def usage_of_choices(results) -> dict:
    """The usage block of n choices over one prompt: the prompt (and its cached tokens) once, every choice's
    completion tokens."""
    first = results[0]
    return _usage(first.prompt_tokens, sum(int(r.completion_tokens) for r in results), first.cached_tokens)


def chat_completion(choices: list[dict], results, *, model: str, request_id: str | None = None,
                    created: int | None = None) -> dict[str, Any]:
    """The `chat.completion` object: `choices` already formatted ({"index", "message", "logprobs",
    "finish_reason"}), `results` their ChatResults (for the usage)."""
    return {"id": request_id or completion_id(), "object": "chat.completion",
            "created": int(time.time()) if created is None else int(created), "model": model,
            "choices": choices, "usage": usage_of_choices(results)}
