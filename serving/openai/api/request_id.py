"""The `x-request-id` header of every response (as vLLM): the client's `X-Request-Id` echoed when it is sane
(printable ASCII, at most MAX_REQUEST_ID characters), else a new id. Errors, streams and 404s included: the
middleware sits outside the guard, and an unexpected error's 500 (answered outside every middleware) takes the
id from the scope (`request_id_of`)."""
from __future__ import annotations

import re
import uuid

HEADER = "x-request-id"
MAX_REQUEST_ID = 128
_SANE = re.compile(rf"[\x21-\x7e](?:[\x20-\x7e]{{0,{MAX_REQUEST_ID - 2}}}[\x21-\x7e])?")
_SCOPE_KEY = "serving.request_id"


def request_id_of(scope) -> str:
    """The request's id: the one the middleware chose, else the client's sane one, else a new one."""
    rid = scope.get(_SCOPE_KEY)
    if rid is None:
        sent = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == HEADER.encode()), "")
        rid = scope[_SCOPE_KEY] = sent if _SANE.fullmatch(sent) else uuid.uuid4().hex
    return rid


class RequestId:
    """Pure ASGI middleware: `x-request-id` on the response (replacing any the app set)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = (HEADER.encode(), request_id_of(scope).encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != header[0]]
                message = dict(message, headers=[*headers, header])
            return await send(message)

        return await self.app(scope, receive, send_with_id)
