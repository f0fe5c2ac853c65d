"""What a caller holds for a submitted request: its stream of deltas, its result, abort and the two-phase settle
(serving/engine.py submits; the engine's loop thread fills the request's queue and events)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from serving.request import ChatResult, Request, StreamDelta

if TYPE_CHECKING:
    from serving.engine import Engine


class RequestHandle:
    """A submitted request: iterate for StreamDelta items; result() for the ChatResult; abort() to cancel."""

    def __init__(self, engine: "Engine", req: "Request"):
        self._engine, self._req = engine, req
        self.request_id = req.rid

    @property
    def prompt_tokens(self) -> int:
        return len(self._req.prompt_ids)

    def prompt_tail(self, n: int = 16) -> str:
        """The last n prompt tokens as text, special tokens included (does the prompt open a <think> block?)."""
        return self._engine.tokenizer.decode(self._req.prompt_ids[-n:], skip_special_tokens=False)

    @property
    def cached_tokens(self) -> int:
        self._req.admitted.wait()
        return self._req.attached

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            item = self._req.out.get()
            if item is None:
                return
            yield item

    def result(self, timeout: float | None = None) -> ChatResult:
        if not self._req.done.wait(timeout):
            raise TimeoutError("request still running")
        return self._req.result

    def abort(self) -> None:
        """Cancel the request; a finished two-phase turn not yet settled is discarded."""
        self._req.aborted = True
        self.settle(False)

    def settle(self, delivered: bool, seen: dict | None = None) -> None:
        """Two-phase requests (two_phase=True): commit the finished turn once its answer was delivered, or
        discard it. seen: the assistant message as the client received it (parsed tool calls, reasoning), which
        the conversation then recognises when the client resends its history. Idempotent; a no-op for other
        requests and after the first call."""
        self._engine._inbox.put(("settle", self._req, bool(delivered), seen))

    @property
    def conversation_turn(self) -> bool:
        """Whether settling commits a conversation's turn (a conversation id was given)."""
        return self._req.key is not None

    def wait_settled(self, timeout: float | None = None) -> bool:
        """After `settle`: wait until the engine committed or discarded the turn; whether it was committed (with a
        state database, written there). False if not settled within `timeout`."""
        return self._req.settled.wait(timeout) and self._req.committed
