"""Engine plumbing: a RequestHandle iterated in a daemon thread, its events in an asyncio queue (`Pump`), the
pumps of one request's n choices together (`PumpGroup`), and blocking engine calls in worker threads (`call`)."""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import Callable

import anyio
from fastapi import Request

log = logging.getLogger("serving.app")

_DISCONNECT_POLL_S = 0.25
SETTLE_WAIT_S = 60.0  # how long a response waits for the engine to commit its turn (a loop step and a write)


class Pump:
    """Iterates a RequestHandle in a daemon thread and posts ("delta", d), ("done", result) or ("error", exc)."""

    def __init__(self, handle, delivery_timeout: float = 120.0):
        self.handle = handle
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.settled = False
        self.failed = False   # the response carries an error: whatever it delivered, nothing commits
        self.delivery_timeout = delivery_timeout
        self.seen: dict | None = None
        self._checked = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="serving-stream", daemon=True)
        self._thread.start()

    def _post(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def _run(self):
        try:
            for delta in self.handle:
                self._post(("delta", delta))
            self._post(("done", self.handle.result()))
        except BaseException as e:  # handed to the event loop
            self._post(("error", e))

    async def next(self, request: Request | None):
        """The next event; None when the client disconnected (the request is then aborted). With a request,
        the connection is checked at least every _DISCONNECT_POLL_S, also while events keep coming."""
        while True:
            if request is not None and time.monotonic() - self._checked >= _DISCONNECT_POLL_S:
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    self.abort()
                    return None
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=_DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass

    def settle(self, delivered: bool):
        """Two-phase commit: the turn commits once its answer was delivered (serving/openai/api/delivery.py) and the
        response carried no error, else it is discarded (called once, by the response that carries the
        answer). `seen` (set by the route) is the answer as the client received it."""
        if not self.settled:
            self.settled = True
            self.handle.settle(delivered and not self.failed, self.seen)

    def fail(self):
        """The response ends in an error: the turn is discarded and its state released at the settle."""
        self.failed = True

    @property
    def conversation_turn(self) -> bool:
        return self.handle.conversation_turn

    async def commit(self) -> bool:
        """Settle as delivered (unless the response failed) and wait until the engine committed the turn (with a
        state database: written there); whether it did."""
        self.settle(True)
        return await call(self.handle.wait_settled, SETTLE_WAIT_S)

    def abort(self):
        if not self.finished:
            self.finished = True
            try:
                self.handle.abort()
            except Exception:
                log.exception("abort failed")


class PumpGroup:
    """The pumps of one request's n choices, aborted and settled together (a response holds one group)."""

    def __init__(self, pumps: list[Pump]):
        self.pumps = pumps
        self.delivery_timeout = pumps[0].delivery_timeout

    def abort(self):
        for p in self.pumps:
            p.abort()

    def fail(self):
        """One choice failed: the whole answer is an error and every choice's state is released at once."""
        for p in self.pumps:
            p.fail()

    def settle(self, delivered: bool):
        for p in self.pumps:
            p.settle(delivered)

    @property
    def conversation_turn(self) -> bool:
        return any(p.conversation_turn for p in self.pumps)

    @property
    def failed(self) -> bool:
        return any(p.failed for p in self.pumps)

    async def commit(self) -> bool:
        return all([await p.commit() for p in self.pumps])

    async def merged(self, firsts: list):
        """(choice index, kind, value) of every choice's events as they come, from their first events on; ends
        when every choice is done or failed."""
        ready = [(i, ev) for i, ev in enumerate(firsts)]
        tasks: dict = {}
        try:
            while ready or tasks:
                for i, ev in ready:
                    kind, val = ev
                    yield i, kind, val
                    if kind == "delta":
                        tasks[asyncio.ensure_future(self.pumps[i].next(None))] = i
                ready = []
                if tasks:
                    done, _ = await asyncio.wait(list(tasks), return_when=asyncio.FIRST_COMPLETED)
                    ready = [(tasks.pop(t), t.result()) for t in done]
        finally:
            for t in tasks:
                t.cancel()


async def call(fn: Callable, *args, **kwargs):
    """Run a blocking engine call in a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
