"""The guard in front of the app (pure ASGI middleware: repeated singleton headers, API key, body size, body read
timeout) and the redaction that keeps a cache_salt out of uvicorn's access log."""
from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Callable
from urllib.parse import unquote_plus

from fastapi.responses import JSONResponse

from serving.openai.api.http_limits import repeated_singleton
from serving.openai.errors import openai_error

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_REQUEST_BODY_TIMEOUT = 30.0
# Routes behind the API key besides /v1/*: they run the tokenizer and the chat template.
KEYED_PATHS = ("/tokenize", "/detokenize")


# --------------------------------------------------------------------------------------------------
# Middleware: API key, request size, body read timeout
# --------------------------------------------------------------------------------------------------

class Guard:
    """Pure ASGI middleware: a repeated singleton header or query parameter (Authorization, X-Cache-Salt,
    X-Conversation-Id, ?cache_salt=) is 400 before anything else; `Authorization: Bearer KEY` on /v1/*, /tokenize
    and /detokenize when an API key is set (401), then the request body read whole: larger than
    `max_request_bytes` is 413, not received within `body_timeout` seconds of the headers (a body shorter than
    its Content-Length, a stalled chunked body) is 408 and the connection is closed. The body is replayed to the
    app, so later receive() calls still report disconnects."""

    def __init__(self, app, *, api_key: str | None, max_request_bytes: int, on_error: Callable[[int], None],
                 body_timeout: float = DEFAULT_REQUEST_BODY_TIMEOUT):
        self.app, self.api_key, self.max_bytes, self.on_error = app, api_key, max_request_bytes, on_error
        self.body_timeout = float(body_timeout)

    async def _reject(self, scope, receive, send, status, message, code, headers=None, param=None):
        self.on_error(status)
        resp = JSONResponse(openai_error(status, message, param=param, code=code), status_code=status,
                            headers=headers)
        await resp(scope, receive, send)

    def keyed(self, path: str) -> bool:
        return path.startswith("/v1/") or path in KEYED_PATHS

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        repeated = repeated_singleton(scope)  # first: the same answer whatever the key (api/http_limits.py)
        if repeated is not None:
            return await self._reject(scope, receive, send, 400, repeated.message, repeated.code,
                                      param=repeated.param)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and self.keyed(scope.get("path", "")):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await self._reject(scope, receive, send, 401, "invalid or missing API key (send "
                                          "'Authorization: Bearer <key>')", "invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        too_large = f"request body is larger than {self.max_bytes} bytes"
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    return await self._reject(scope, receive, send, 413, too_large, "request_too_large")
            except ValueError:
                return await self._reject(scope, receive, send, 400, "bad Content-Length", "invalid_request")
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._read_body(receive)
        except TimeoutError:
            return await self._reject(scope, receive, send, 408, f"the request body was not received within "
                                      f"{self.body_timeout:g} s", "request_timeout", headers={"Connection": "close"})
        if body is None:
            return  # the client left before sending its body
        if body is False:
            return await self._reject(scope, receive, send, 413, too_large, "request_too_large")
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()

        return await self.app(scope, replay_receive, send)

    async def _read_body(self, receive) -> bytes | None | bool:
        """The whole body; None if the client disconnected, False if it grew past the size bound."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return None
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return False
            chunks.append(body)
            if not msg.get("more_body", False):
                return b"".join(chunks)


# --------------------------------------------------------------------------------------------------
# The salt never reaches a log: uvicorn's access log (on with --log-level debug) has it redacted from query strings
# --------------------------------------------------------------------------------------------------

def redact_query(target: str) -> str:
    """A request target with the value of every `cache_salt` query parameter replaced by `***`."""
    path, sep, query = target.partition("?")
    if not sep or "salt" not in unquote_plus(query).lower():
        return target
    parts = []
    for pair in query.split("&"):
        key, eq, _ = pair.partition("=")
        parts.append(f"{key}=***" if unquote_plus(key).strip().lower() == "cache_salt" else pair)
    return path + "?" + "&".join(parts)


class RedactSalt(logging.Filter):
    """On uvicorn's access logger: the request target (its args[2]) without cache_salt values."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = args[:2] + (redact_query(args[2]),) + args[3:]
        return True


def install_log_redaction() -> None:
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSalt) for f in logger.filters):
        logger.addFilter(RedactSalt())
