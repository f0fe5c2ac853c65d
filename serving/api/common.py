"""What every API module of the server shares: the guard (ASGI middleware: API key, body size, body read timeout),
the error handlers (every error in OpenAI's shape), the engine pump (a RequestHandle iterated in a thread, its
events in an asyncio queue), SSE helpers, the salt rules, and `ServerContext`, the per-app state the routers are
built over.
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
from urllib.parse import unquote_plus

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api.delivery import Delivery
from serving.api.http_limits import repeated_singleton
from serving.chat_output import OutputConfig
from serving.metrics import Metrics
from serving.openai.errors import APIError, as_api_error, openai_error, validation_error
from serving.openai.fields import check_id
from serving.openai.logprobs import LogprobFormatter
from serving.openai.parse import engine_vocab_size, parse_request

log = logging.getLogger("serving.app")

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_REQUEST_BODY_TIMEOUT = 30.0
_DISCONNECT_POLL_S = 0.25
SETTLE_WAIT_S = 60.0  # how long a response waits for the engine to commit its turn (a loop step and a write)
_INLINE_PARSE_BYTES = 64 * 1024   # larger bodies are parsed in a worker thread, off the event loop
# Routes behind the API key besides /v1/*: they run the tokenizer and the chat template.
KEYED_PATHS = ("/tokenize", "/detokenize")

try:
    from importlib.metadata import version as _pkg_version

    __version__ = _pkg_version("hybrid-serve")
except Exception:  # not installed
    __version__ = "0.1.0"


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


# --------------------------------------------------------------------------------------------------
# Engine plumbing: the blocking handle iterator in a thread, events into an asyncio queue
# --------------------------------------------------------------------------------------------------

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
        """Two-phase commit: the turn commits once its answer was delivered (serving/api/delivery.py) and the
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


def sse(obj, event: str | None = None) -> str:
    """One server-sent event: `data: {json}` (chat, completions), with an `event:` line when named (responses)."""
    data = "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
    return f"event: {event}\n{data}" if event else data


async def commit_before_last(delivery: Delivery, pump: "Pump | PumpGroup") -> bool:
    """A conversation turn's answer, all but its last event or byte sent: wait until the client acknowledged
    them, then commit the turn (durably, with a state database). Returns whether to send the last part: a client
    that holds the whole answer thus always finds its turn committed, even if the server is killed right after.
    False (the turn is discarded, the answer left unfinished) if the client did not read in time or the commit
    was refused (another replica advanced the conversation)."""
    if not await delivery.confirmed(pump.delivery_timeout):
        pump.settle(False)
        return False
    return await pump.commit() or pump.failed


class AbortingStreamingResponse(StreamingResponse):
    """An SSE response that aborts its request however the response ends early: client disconnect (the stream
    task is cancelled, possibly before the body generator ever started), a failed send, or an error. After a
    complete stream the abort is a no-op, and the turn settles as delivered once the client acknowledged the
    last byte (serving/api/delivery.py); a conversation turn commits before its last event is sent
    (`commit_before_last`)."""

    def __init__(self, content, pump: Pump):
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


class DeliveringJSONResponse(JSONResponse):
    """A whole-body answer whose turn commits once the client acknowledged the body's last byte (discarded if
    sending failed or it was not acknowledged in time)."""

    def __init__(self, content, pump: Pump):
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


# --------------------------------------------------------------------------------------------------
# Small request helpers
# --------------------------------------------------------------------------------------------------

def header_id(request: Request, header: str, param: str) -> str | None:
    """An id sent as a header, read as UTF-8 (as a body field is) and held to the rules of an id."""
    raw = request.headers.get(header.lower())
    if raw is None:
        return None
    try:
        raw = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise APIError(400, f"the {header} header must be UTF-8 text", param=param, code="invalid_value") from None
    return check_id(raw, param)


def header_salt(request: Request) -> str | None:
    """The X-Cache-Salt header."""
    return header_id(request, "X-Cache-Salt", "cache_salt")


def check_salt(salt: str | None, param: str = "cache_salt") -> str | None:
    return check_id(salt, param)


def query_salt(request: Request) -> str | None:
    """The cache_salt of a GET/DELETE: the `X-Cache-Salt` header, else the `cache_salt` query parameter (the
    header wins when both are given; prefer it: query strings end up in access logs)."""
    h = header_salt(request)
    if h is not None:
        return h
    return check_id(request.query_params.get("cache_salt"), "cache_salt")


def vocab_size(engine) -> int:
    return engine_vocab_size(engine)


# --------------------------------------------------------------------------------------------------
# The per-app context the routers share
# --------------------------------------------------------------------------------------------------

class ServerContext:
    """The engine, its served name, the metrics registry and the request plumbing every router uses."""

    def __init__(self, engine, *, served_model_name: str | None = None, metrics: Metrics | None = None,
                 require_cache_salt: bool = False, output: OutputConfig | None = None):
        self.engine = engine
        self.output = output or OutputConfig()   # tool-call and reasoning parsers (serving/chat_output.py)
        self.require_cache_salt = bool(require_cache_salt)
        self.vocab_size = engine_vocab_size(engine) or None
        self.model_name = served_model_name or getattr(engine, "model_name", None) or "default"
        self.accepted_models = {self.model_name, getattr(engine, "model_name", self.model_name)}
        self.max_model_len = int(getattr(engine, "max_model_len", 0) or 0)
        self.created = int(time.time())
        self.delivery_timeout = float(getattr(engine, "delivery_timeout", 120.0))  # see serving/api/delivery.py

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

    # ------------------------------------------------------------------ requests
    async def parse(self, request: Request, model):
        """The request body validated into `model` (serving.openai: the one place of the rules), 400 if it
        breaks one. Large bodies are parsed in a worker thread, off the event loop."""
        raw = await request.body()
        if len(raw) > _INLINE_PARSE_BYTES:
            return await call(parse_request, model, raw, vocab_size=self.vocab_size)
        return parse_request(model, raw, vocab_size=self.vocab_size)

    def salt(self, request: Request, body_salt: str | None, *, id_param: str | None = None) -> str | None:
        """The cache_salt of a request: the X-Cache-Salt header, else the body's field (the header wins when
        both are given). With --require-cache-salt a request carrying an id (`id_param`: conversation_id,
        previous_response_id) must have one."""
        salt = header_salt(request)
        if salt is None:
            salt = body_salt
        self.require_salt(salt, id_param)
        return salt

    @staticmethod
    def conversation_id(request: Request, body_id: str | None) -> str | None:
        """A request's conversation_id: the body's field or the X-Conversation-Id header (which load balancers
        can hash on, docs/deploy.md); 400 if both are given and differ."""
        header = header_id(request, "X-Conversation-Id", "conversation_id")
        if header is None:
            return body_id
        if body_id is not None and body_id != header:
            raise APIError(400, "the X-Conversation-Id header and the body's conversation_id differ",
                           param="conversation_id", code="conflicting_conversation_id")
        return header

    def require_salt(self, salt: str | None, id_param: str | None) -> None:
        if salt is None and id_param is not None and self.require_cache_salt:
            raise APIError(400, f"this server requires a cache_salt with {id_param} (send the X-Cache-Salt "
                                "header)", param="cache_salt", code="cache_salt_required")

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
            shown = name if len(name) <= 200 else name[:200] + "..."
            raise APIError(404, f"the model {shown!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ generation
    async def start(self, fn: Callable, *args, **kwargs):
        """Submit to the engine and wait for its first event (errors before any output become a status)."""
        t0 = time.perf_counter()
        try:
            handle = await call(fn, *args, two_phase=True, **kwargs)
        except Exception as e:
            raise as_api_error(e) from None
        pump = Pump(handle, self.delivery_timeout)
        return pump, t0

    async def start_many(self, fn: Callable, *args, **kwargs) -> tuple[PumpGroup, float]:
        """start() for an engine call that returns one handle per choice."""
        t0 = time.perf_counter()
        try:
            handles = await call(fn, *args, two_phase=True, **kwargs)
        except Exception as e:
            raise as_api_error(e) from None
        return PumpGroup([Pump(h, self.delivery_timeout) for h in handles]), t0

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
                        pump.fail()
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
                    pump.fail()
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
