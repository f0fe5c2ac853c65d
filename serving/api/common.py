"""What every API module of the server shares: the API-key and body-size guard (ASGI middleware), the error
handlers (every error in OpenAI's shape), the engine pump (a RequestHandle iterated in a thread, its events in an
asyncio queue), SSE helpers and `ServerContext`, the per-app state the routers are built over.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
import time
from typing import Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import Metrics
from serving.protocol import MAX_ID_LEN, APIError, LogprobFormatter, as_api_error, openai_error, validation_error

log = logging.getLogger("serving.app")

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
_DISCONNECT_POLL_S = 0.25

try:
    from importlib.metadata import version as _pkg_version

    __version__ = _pkg_version("hybrid-serve")
except Exception:  # not installed
    __version__ = "0.1.0"


# --------------------------------------------------------------------------------------------------
# Middleware: API key and request size
# --------------------------------------------------------------------------------------------------

class Guard:
    """Pure ASGI middleware: `Authorization: Bearer KEY` on /v1/* when an API key is set, then a bound on the
    request body (413). The body is read here and replayed, so later receive() calls still report disconnects."""

    def __init__(self, app, *, api_key: str | None, max_request_bytes: int, on_error: Callable[[int], None]):
        self.app, self.api_key, self.max_bytes, self.on_error = app, api_key, max_request_bytes, on_error

    async def _reject(self, scope, receive, send, status, message, code, headers=None):
        self.on_error(status)
        resp = JSONResponse(openai_error(status, message, code=code), status_code=status, headers=headers)
        await resp(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path", "").startswith("/v1/"):
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
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before sending its body
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, 413, too_large, "request_too_large")
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()

        return await self.app(scope, replay_receive, send)


# --------------------------------------------------------------------------------------------------
# Engine plumbing: the blocking handle iterator in a thread, events into an asyncio queue
# --------------------------------------------------------------------------------------------------

class Pump:
    """Iterates a RequestHandle in a daemon thread and posts ("delta", d), ("done", result) or ("error", exc)."""

    def __init__(self, handle):
        self.handle = handle
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.settled = False
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
        """Two-phase commit: the turn commits once its answer was handed to the transport, else it is
        discarded (called once, by the response that carries the answer)."""
        if not self.settled:
            self.settled = True
            self.handle.settle(delivered)

    def abort(self):
        if not self.finished:
            self.finished = True
            try:
                self.handle.abort()
            except Exception:
                log.exception("abort failed")


async def call(fn: Callable, *args, **kwargs):
    """Run a blocking engine call in a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def sse(obj, event: str | None = None) -> str:
    """One server-sent event: `data: {json}` (chat, completions), with an `event:` line when named (responses)."""
    data = "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
    return f"event: {event}\n{data}" if event else data


class AbortingStreamingResponse(StreamingResponse):
    """An SSE response that aborts its request however the response ends early: client disconnect (the stream
    task is cancelled, possibly before the body generator ever started), a failed send, or an error. After a
    complete stream the abort is a no-op."""

    def __init__(self, content, pump: Pump):
        super().__init__(self._tracked(content), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.pump, self.completed = pump, False

    async def _tracked(self, content):
        async for chunk in content:
            yield chunk
        self.completed = True  # asked for more after the last event was sent: all of it reached the transport

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.pump.abort()
            self.pump.settle(self.completed)


class DeliveringJSONResponse(JSONResponse):
    """A whole-body answer whose turn commits once the body was sent (discarded if sending failed)."""

    def __init__(self, content, pump: Pump):
        super().__init__(content)
        self.pump = pump

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            self.pump.settle(False)
            raise
        self.pump.settle(True)


# --------------------------------------------------------------------------------------------------
# Small request helpers
# --------------------------------------------------------------------------------------------------

def header_salt(request: Request) -> str | None:
    return request.headers.get("x-cache-salt")


def check_salt(salt: str | None, param: str = "cache_salt") -> str | None:
    if salt is not None and (not salt or len(salt) > MAX_ID_LEN):
        raise APIError(400, f"cache_salt must be a non-empty string of at most {MAX_ID_LEN} characters",
                       param=param, code="invalid_value")
    return salt


def query_salt(request: Request) -> str | None:
    """The cache_salt of a GET/DELETE: the `cache_salt` query parameter or the `X-Cache-Salt` header (they must
    agree when both are given)."""
    q = request.query_params.get("cache_salt")
    h = header_salt(request)
    if q is not None and h is not None and q != h:
        raise APIError(400, "cache_salt query parameter and X-Cache-Salt header differ", param="cache_salt",
                       code="invalid_value")
    return check_salt(q if q is not None else h)


def vocab_size(engine) -> int:
    cfg = getattr(engine, "cfg", None)
    v = getattr(cfg, "vocab_size", None) or getattr(engine.tokenizer, "vocab_size", 0)
    return int(v or 0)


# --------------------------------------------------------------------------------------------------
# The per-app context the routers share
# --------------------------------------------------------------------------------------------------

class ServerContext:
    """The engine, its served name, the metrics registry and the request plumbing every router uses."""

    def __init__(self, engine, *, served_model_name: str | None = None, metrics: Metrics | None = None):
        self.engine = engine
        self.model_name = served_model_name or getattr(engine, "model_name", None) or "default"
        self.accepted_models = {self.model_name, getattr(engine, "model_name", self.model_name)}
        self.max_model_len = int(getattr(engine, "max_model_len", 0) or 0)
        self.created = int(time.time())

        # Metrics: one registry per app. The engine observes the latency histograms when it has a `metrics`
        # hook (we attach ours if it still has its no-op one); otherwise the app observes them itself.
        engine_metrics = getattr(engine, "metrics", None)
        if metrics is None:
            metrics = engine_metrics if isinstance(engine_metrics, Metrics) else Metrics()
        metrics.bind_engine(engine)
        engine_observes = hasattr(engine, "metrics")
        if engine_observes and engine_metrics is not metrics and not isinstance(engine_metrics, Metrics):
            try:
                engine.metrics = metrics
            except Exception:
                engine_observes = False
        elif engine_observes and engine_metrics is not metrics:
            engine_observes = False  # another app's metrics already sits in the engine
        self.metrics, self.engine_observes = metrics, engine_observes
        self.lp_fmt = LogprobFormatter(engine.tokenizer)

    # ------------------------------------------------------------------ errors
    def error_response(self, err: APIError) -> JSONResponse:
        self.metrics.count_error(err.status)
        return JSONResponse(openai_error(err.status, err.message, type=err.type, param=err.param, code=err.code),
                            status_code=err.status)

    def error_event(self, err: APIError) -> str:
        self.metrics.count_error(err.status)
        return sse(openai_error(err.status, err.message, type=err.type, param=err.param, code=err.code))

    @staticmethod
    def finish_error(result) -> APIError | None:
        """A result that ended in error or abort is answered as an error."""
        if result.finish_reason == "error":
            return APIError(500, f"generation failed: {getattr(result, 'error', None) or 'engine error'}",
                            code="generation_error")
        if result.finish_reason == "abort":
            return APIError(503, "the request was aborted", code="aborted")
        return None

    def check_model(self, name: str | None):
        if name and name not in self.accepted_models:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ generation
    async def start(self, fn: Callable, *args, **kwargs):
        """Submit to the engine and wait for its first event (errors before any output become a status)."""
        t0 = time.perf_counter()
        try:
            handle = await call(fn, *args, two_phase=True, **kwargs)
        except Exception as e:
            raise as_api_error(e) from None
        pump = Pump(handle)
        return pump, t0

    async def first_event(self, pump: Pump, request: Request):
        ev = await pump.next(request)
        if ev is None:
            return None
        kind, val = ev
        if kind == "error":
            pump.abort()
            raise as_api_error(val)
        if kind == "done" and self.finish_error(val) is not None:
            pump.finished = True
            raise self.finish_error(val)
        return ev

    async def collect(self, pump: Pump, request: Request, ev):
        """Drain the pump to its final result (non-streaming); None if the client left."""
        while ev is not None:
            kind, val = ev
            if kind == "done":
                pump.finished = True
                return val
            if kind == "error":
                raise as_api_error(val)
            ev = await pump.next(request)
        return None

    def observe_local(self, t0, t_first, t_prev, now):
        if self.engine_observes:
            return t_first, now
        if t_first is None:
            self.metrics.observe_ttft(now - t0)
            return now, now
        self.metrics.observe_itl(now - t_prev)
        return t_first, now

    def observe_e2e(self, t0):
        if not self.engine_observes:
            self.metrics.observe_e2e(time.perf_counter() - t0)

    async def stream_events(self, pump: Pump, first, t0, make_chunk, make_final, usage_chunk, endpoint: str):
        """SSE body. make_chunk(delta) -> dict | None; make_final(result) -> dict; usage_chunk(result) -> dict|None."""
        ev = first
        t_first = t_prev = None
        try:
            while ev is not None:
                kind, val = ev
                if kind == "delta":
                    if val.token_ids or val.text:
                        t_first, t_prev = self.observe_local(t0, t_first, t_prev, time.perf_counter())
                    chunk = make_chunk(val)
                    if chunk is not None:
                        yield sse(chunk)
                elif kind == "done":
                    pump.finished = True
                    err = self.finish_error(val)
                    if err is not None:
                        yield self.error_event(err)
                    else:
                        yield sse(make_final(val))
                        u = usage_chunk(val)
                        if u is not None:
                            yield sse(u)
                    self.metrics.count_request(endpoint, val.finish_reason)
                    self.observe_e2e(t0)
                    yield "data: [DONE]\n\n"
                    return
                else:  # error after the stream started (the finally aborts the request)
                    yield self.error_event(as_api_error(val))
                    yield "data: [DONE]\n\n"
                    return
                ev = await pump.next(None)  # disconnects cancel this generator (see finally)
        finally:
            # Client gone (generator cancelled or closed) before the end: discard the turn (I3).
            pump.abort()

    @staticmethod
    def sse_response(gen, pump: Pump) -> StreamingResponse:
        return AbortingStreamingResponse(gen, pump)


# --------------------------------------------------------------------------------------------------
# Error handlers
# --------------------------------------------------------------------------------------------------

def install_error_handlers(app: FastAPI, ctx: ServerContext) -> None:
    """Every error as OpenAI's body with its status: 400 for validation (never FastAPI's 422), 404/405 for
    routing, the APIError's own status, 500 for anything unexpected."""
    metrics = ctx.metrics

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return ctx.error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 404:
            msg = f"no route {request.method} {request.url.path}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        err = APIError(status, msg, code=code)
        metrics.count_error(status)
        return JSONResponse(openai_error(status, err.message, type=err.type, code=code), status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return ctx.error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return ctx.error_response(as_api_error(exc))
