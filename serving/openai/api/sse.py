"""Server-sent events: the one SSE writer of every streamed answer (chat completions, completions, responses) and
the response that carries it.

`write_sse(ctx, group, firsts, t0, form)` runs the loop: the engine's events of every choice as they come (a
`PumpGroup`, one pump for completions and responses), the latency metrics, an engine error or a failed result
ending the stream, and the abort of the request however the stream ends. What each event looks like on the wire
is the API's own `SSEForm`: its events before the first token, per delta, per finished choice, at the end, and
for an error. `StreamUsage` is the `usage` of the chat and completions chunks (`stream_options`).
"""
from __future__ import annotations

import json
import time
from typing import Iterable, Protocol

from fastapi.responses import StreamingResponse

from serving.openai import bodies
from serving.openai.api.delivery import Delivery, commit_before_last
from serving.openai.api.pump import PumpGroup
from serving.openai.errors import APIError, as_api_error

DONE = "data: [DONE]\n\n"


def sse(obj, event: str | None = None) -> str:
    """One server-sent event: `data: {json}` (chat, completions), with an `event:` line when named (responses)."""
    data = "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
    return f"event: {event}\n{data}" if event else data


class SSEForm(Protocol):
    """An API's events; each method returns the events to send, in order."""

    def opening(self) -> Iterable[str]:
        """Before the first delta."""

    def delta(self, index: int, delta) -> Iterable[str]:
        """A StreamDelta of choice `index`."""

    def finished(self, index: int, result) -> Iterable[str]:
        """Choice `index` finished with `result` (a ChatResult that is no error)."""

    def closing(self, results: list) -> Iterable[str]:
        """Every choice finished."""

    def error(self, err: APIError, result) -> Iterable[str]:
        """The stream ends in `err`: a result that ended in error or abort (`result`), or an engine error after
        the stream started (`result` None). The form fails the group if the turn must be discarded."""


class StreamUsage:
    """The `usage` of a stream's chunks (`stream_options`). With `include_usage`: null in every chunk, and the
    totals in a last usage-only chunk (the form's closing). With `continuous_usage_stats` too (as vLLM, which
    ignores it without `include_usage`): every chunk carries its choice's running count, the prompt tokens and
    the completion tokens of that choice so far (the finish chunk: the choice's final count)."""

    def __init__(self, options, group: PumpGroup):
        self.include = bool(options and options.include_usage)
        self.continuous = self.include and options.continuous_usage_stats
        self.prompt = group.pumps[0].handle.prompt_tokens if self.continuous else 0
        self.tokens = [0] * len(group.pumps)

    def count(self, index: int, delta) -> None:
        """A StreamDelta of choice `index` (before its chunk is made)."""
        self.tokens[index] += len(delta.token_ids)

    def finish(self, index: int, result) -> None:
        """Choice `index` finished (before its finish chunk is made): a final stop token is counted too."""
        self.tokens[index] = int(result.completion_tokens)

    def stamp(self, chunk: dict, index: int) -> dict:
        """`chunk` of choice `index` with its usage."""
        if self.continuous:
            chunk["usage"] = bodies.running_usage(self.prompt, self.tokens[index])
        elif self.include:
            chunk["usage"] = None
        return chunk


async def write_sse(ctx, group: PumpGroup, firsts: list, t0: float, form: SSEForm):
    """The SSE body of a streamed answer (`ctx`: the app's ServerContext; `firsts`: each pump's first event)."""
    t_first = t_prev = None
    results = [None] * len(group.pumps)
    try:
        for event in form.opening():
            yield event
        async for i, kind, val in group.merged(firsts):  # disconnects cancel this generator (see finally)
            if kind == "delta":
                if val.token_ids or val.text:
                    t_first, t_prev = ctx.observe_local(t0, t_first, t_prev, time.perf_counter())
                for event in form.delta(i, val):
                    yield event
                continue
            if kind == "done":
                group.pumps[i].finished = True
            err = ctx.finish_error(val) if kind == "done" else as_api_error(val)
            if err is not None:
                for event in form.error(err, val if kind == "done" else None):
                    yield event
                return
            results[i] = val
            for event in form.finished(i, val):
                yield event
        ctx.observe_e2e(t0)
        for event in form.closing(results):
            yield event
    finally:
        # Client gone (generator cancelled or closed) before the end: discard the turns (I3); after a complete
        # stream a no-op.
        group.abort()


class AbortingStreamingResponse(StreamingResponse):
    """An SSE response that aborts its request however the response ends early: client disconnect (the stream
    task is cancelled, possibly before the body generator ever started), a failed send, or an error. After a
    complete stream the abort is a no-op, and the turn settles as delivered once the client acknowledged the
    last byte (serving/openai/api/delivery.py); a conversation turn commits before its last event is sent
    (`commit_before_last`)."""

    def __init__(self, content, pump: PumpGroup):
        super().__init__(self._tracked(content), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.pump, self.completed, self.delivery = pump, False, None

    async def _tracked(self, content):
        last = None
        async for chunk in content:
            if last is not None:
                yield last
            last = chunk
        if self.pump.conversation_turn and not await commit_before_last(self.delivery, self.pump):
            return
        if last is not None:
            yield last
        self.completed = True  # asked for more after the last event was sent: all of it reached the transport

    async def __call__(self, scope, receive, send):
        self.delivery = delivery = Delivery(scope)
        delivered = False
        try:
            await super().__call__(scope, receive, send)
            delivered = self.completed and (self.pump.conversation_turn or
                                            await delivery.confirmed(self.pump.delivery_timeout))
        finally:
            delivery.close()
            self.pump.abort()
            self.pump.settle(delivered)


def sse_response(ctx, group: PumpGroup, firsts: list, t0: float, form: SSEForm) -> AbortingStreamingResponse:
    """The streamed answer of `group` in `form`."""
    return AbortingStreamingResponse(write_sse(ctx, group, firsts, t0, form), group)
