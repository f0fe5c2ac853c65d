"""Limits at the connection level, below the app (docs/server.md, "Requests at the edge"):

* `repeated_singleton(scope)`: a request that repeats a header or query parameter the server reads once
  (`Authorization`, `X-Cache-Salt`, `X-Conversation-Id`, `?cache_salt=`) is refused (400) by the guard, before the
  key check, so no reader of it can pick another copy than its neighbour did (first-wins vs last-wins behind a
  gateway that appends its own tenant header would be a cross-tenant leak).
* `limited_protocol(...)`: uvicorn's h11 protocol (forced, whichever of h11 and httptools is installed) with a
  request-head timeout (a connection whose request head is not complete within it is closed: a fresh connection
  that sends nothing silently, a partial head after a 408) and a cap on open connections (a connection opened
  beyond it has its request answered 503 and is closed). The idle keep-alive timeout after a response is uvicorn's
  own `timeout_keep_alive`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import parse_qsl

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.openai.errors import APIError, openai_error

log = logging.getLogger("serving.app")

# Header name (lower case, as in the ASGI scope) -> (its name in messages, the OpenAI `param` of the error).
SINGLETON_HEADERS = {b"authorization": ("Authorization", None), b"x-cache-salt": ("X-Cache-Salt", "cache_salt"),
                     b"x-conversation-id": ("X-Conversation-Id", "conversation_id")}
SINGLETON_QUERY = ("cache_salt",)
DEFAULT_HEADER_TIMEOUT = 60.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 1000
_REFUSAL_LOG_EVERY_S = 60.0


def repeated_singleton(scope) -> APIError | None:
    """The 400 for a request that repeats a singleton header or query parameter, else None. It names what was
    repeated, never a value (so it says nothing about whether a key was right)."""
    seen: dict[bytes, int] = {}
    for name, _ in scope.get("headers", ()):
        name = name.lower()
        if name in SINGLETON_HEADERS:
            seen[name] = seen.get(name, 0) + 1
    for name, n in seen.items():
        if n > 1:
            shown, param = SINGLETON_HEADERS[name]
            return APIError(400, f"the {shown} header was sent {n} times; send it once", param=param,
                            code="duplicate_header")
    query = scope.get("query_string", b"")
    if query:  # at most the request head's size (h11 bounds it)
        keys = [k for k, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
        for k in SINGLETON_QUERY:
            if keys.count(k) > 1:
                return APIError(400, f"the {k} query parameter was given {keys.count(k)} times; give it once",
                                param=k, code="duplicate_parameter")
    return None


def _json_response(status: int, reason: str, body: dict, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response that closes its connection, written below h11 (no request may be parsed yet)."""
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode("latin-1") + data


async def _over_capacity(scope, receive, send):
    """The ASGI app of a connection opened beyond --max-connections: 503 in OpenAI's shape, then close."""
    body = json.dumps(openai_error(503, "too many open connections to this server; retry later",
                                   code="too_many_connections")).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Refusals:
    """Counts connections refused at the cap; logs a warning at most once a minute."""
    count, logged_at = 0, float("-inf")

    @classmethod
    def note(cls, cap: int) -> None:
        cls.count += 1
        now = time.monotonic()
        if now - cls.logged_at >= _REFUSAL_LOG_EVERY_S:
            cls.logged_at = now
            log.warning("more than %d open connections: %d connections answered 503 so far (--max-connections)",
                        cap, cls.count)


def limited_protocol(*, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                     max_connections: int | None = DEFAULT_MAX_CONNECTIONS) -> type[H11Protocol]:
    """uvicorn's H11Protocol with a request-head timeout and a connection cap (the module docstring). Pass it as
    `uvicorn.Config(http=...)`, with `limit_concurrency=None` (this cap replaces it) and `timeout_keep_alive`."""

    class LimitedH11Protocol(H11Protocol):
        HEADER_TIMEOUT, MAX_CONNECTIONS = float(header_timeout), max_connections or None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = False
            if self.MAX_CONNECTIONS and len(self.connections) > self.MAX_CONNECTIONS:
                self.app = _over_capacity  # this connection's request is answered 503; the others are untouched
                _Refusals.note(self.MAX_CONNECTIONS)
            self._arm_head_timer()  # a fresh connection must send its first request head in time

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()  # the head is complete (or the connection is done)
            else:
                self._head_bytes = self._head_bytes or bool(data)
                self._arm_head_timer()  # a request head has begun: its deadline runs from its first bytes

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._head_bytes = False
            super().on_response_complete()  # arms uvicorn's keep-alive timer until the next request's bytes

        def _arm_head_timer(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(self.HEADER_TIMEOUT, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self._head_bytes:  # a partial request head: say why before closing
                msg = f"the request head was not received within {self.HEADER_TIMEOUT:g} s"
                self.transport.write(_json_response(408, "Request Timeout",
                                                    openai_error(408, msg, code="request_timeout")))
            self.transport.close()

    return LimitedH11Protocol


def fit_fd_limit(max_connections: int, *, reserve: int = 256) -> None:
    """Raise the soft open-file limit so `max_connections` connections fit (two descriptors each: the socket and
    the duplicate a response holds to confirm delivery, plus `reserve` for the engine's files), up to the hard
    limit; warn when it stays below."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return
    want = 2 * max_connections + reserve if max_connections else 0
    if want <= soft or soft == resource.RLIM_INFINITY:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (OSError, ValueError):
        new = soft
    if new < want:
        log.warning("the open-file limit (%d) is below what --max-connections %d needs (%d): past it, new "
                    "connections wait in the listen queue instead of getting 503", new, max_connections, want)
