"""When an answer counts as delivered: the client's TCP stack acknowledged its last byte.

A turn commits only once its answer was delivered (two-phase commit, docs/design.md). Handing the bytes to the
server's transport is not enough: a client that reads nothing still has hundreds of kilobytes accepted into the
server's socket buffers. So the response keeps its own reference to the connection's socket (a duplicated file
descriptor, taken before the first byte, since the server may close its own right after the last one) and, after
its last byte, waits until the transport's buffer is empty, the kernel's send queue is empty (every byte sent and
acknowledged by the peer: Linux's SIOCOUTQ) and the connection was not reset. Behind a proxy the peer is the
proxy. Where that cannot be read (no TCP socket, not Linux) the answer counts as delivered once the transport's
buffer is empty: handed to the kernel.

`TransportTap` (ASGI middleware) puts uvicorn's transport into the request scope; `Delivery` is one response's
view of its connection; `commit_before_last` commits a conversation turn before the last byte of its answer is
sent, and `DeliveringJSONResponse` is a whole-body answer that settles its turn so (streamed answers:
serving/openai/api/sse.py).
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import sys
import termios

from fastapi.responses import JSONResponse

log = logging.getLogger("serving.app")

TRANSPORT = "hybrid_serve.transport"   # the scope key of the connection's asyncio transport
_POLL_MAX_S = 0.05
_TCP_CLOSE = 7   # linux/tcp_states.h: the connection is gone (reset, or closed before all was acknowledged)


class TransportTap:
    """Pure ASGI middleware: records the connection's transport in the scope (uvicorn's request cycle holds it as
    `receive.__self__.transport`); other servers leave it out and answers count as handed to the kernel."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            transport = getattr(getattr(receive, "__self__", None), "transport", None)
            if transport is not None:
                scope[TRANSPORT] = transport
        return await self.app(scope, receive, send)


class Delivery:
    """One response's hold on its connection (open it before sending the first byte; close it after)."""

    def __init__(self, scope):
        self.transport = scope.get(TRANSPORT)
        self.sock: socket.socket | None = None
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sys.platform == "linux" and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                self.sock = socket.socket(fileno=os.dup(sock.fileno()))
            except OSError:
                self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _pending_bytes(self) -> int | None:
        """Bytes not yet acknowledged by the peer (the transport's buffer plus the kernel's send queue); None
        if the connection was reset first."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        if self.sock is None:
            return buffered
        try:
            tcp_state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
            queued = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return None
        return None if tcp_state == _TCP_CLOSE else buffered + queued

    async def confirmed(self, timeout: float) -> bool:
        """Wait until every byte sent was acknowledged by the peer (see the module docstring); False if the
        connection was reset first or `timeout` seconds passed. Closes this hold on the connection."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + timeout, 0.001
        try:
            while True:
                pending = self._pending_bytes()
                if pending is None:
                    return False
                if pending == 0:
                    return True
                if loop.time() >= deadline:
                    log.warning("an answer was not acknowledged by the client within %.0fs (%d bytes unread); "
                                "its turn is discarded", timeout, pending)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)
        finally:
            self.close()


async def commit_before_last(delivery: Delivery, pump) -> bool:
    """A conversation turn's answer (`pump`: its Pump or PumpGroup), all but its last event or byte sent: wait
    until the client acknowledged them, then commit the turn (durably, with a state database). Returns whether to
    send the last part: a client that holds the whole answer thus always finds its turn committed, even if the
    server is killed right after. False (the turn is discarded, the answer left unfinished) if the client did not
    read in time or the commit was refused (another replica advanced the conversation)."""
    if not await delivery.confirmed(pump.delivery_timeout):
        pump.settle(False)
        return False
    return await pump.commit() or pump.failed


class DeliveringJSONResponse(JSONResponse):
    """A whole-body answer whose turn commits once the client acknowledged the body's last byte (discarded if
    sending failed or it was not acknowledged in time)."""

    def __init__(self, content, pump):
        super().__init__(content)
        self.pump = pump

    async def __call__(self, scope, receive, send):
        delivery = Delivery(scope)
        delivered = False
        try:
            if self.pump.conversation_turn:  # all but the last byte, then the commit (`commit_before_last`)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": self.body[:-1], "more_body": True})
                if await commit_before_last(delivery, self.pump):
                    await send({"type": "http.response.body", "body": self.body[-1:]})
                    delivered = True
            else:
                await super().__call__(scope, receive, send)
                delivered = await delivery.confirmed(self.pump.delivery_timeout)
        finally:
            delivery.close()
            self.pump.settle(delivered)

