"""What every route module of the server shares: `ServerContext`, the per-app state the routers are built over
(the engine, the metrics, request parsing, the salt and conversation id rules, starting a request and reading its
events), the request helpers for ids sent as headers or query parameters, and the error handlers (every error in
OpenAI's shape). The guard is serving/openai/api/guard.py, the engine pump serving/openai/api/pump.py, the SSE writer
serving/openai/api/sse.py.
"""
from __future__ import annotations

import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import Metrics
from serving.openai.api.pump import Pump, PumpGroup, call
from serving.openai.api.request_id import HEADER, request_id_of
from serving.openai.api.sse import sse
from serving.openai.chat_output import OutputConfig
from serving.openai.errors import APIError, as_api_error, check_model, finish_error, openai_error, validation_error
from serving.openai.fields import check_id
from serving.openai.logprobs import LogprobFormatter
from serving.openai.parse import engine_vocab_size, parse_request, served_names

_INLINE_PARSE_BYTES = 64 * 1024   # larger bodies are parsed in a worker thread, off the event loop

try:
    from importlib.metadata import version as _pkg_version

    __version__ = _pkg_version("hybrid-serve")
except Exception:  # not installed
    __version__ = "0.1.0"


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


def query_salt(request: Request) -> str | None:
    """The cache_salt of a GET/DELETE: the `X-Cache-Salt` header, else the `cache_salt` query parameter (the
    header wins when both are given; prefer it: query strings end up in access logs)."""
    h = header_salt(request)
    if h is not None:
        return h
    return check_id(request.query_params.get("cache_salt"), "cache_salt")


def bind_metrics(engine, metrics: Metrics | None) -> tuple[Metrics, bool]:
    """One registry per app, and whether the engine observes the latency histograms: it does when it has a
    `metrics` hook (ours is attached if it still has its no-op one); otherwise the app observes them itself."""
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
    return metrics, engine_observes


# --------------------------------------------------------------------------------------------------
# The per-app context the routers share
# --------------------------------------------------------------------------------------------------

class ServerContext:
    """The engine, its served name, the metrics registry and the request plumbing every router uses."""

    def __init__(self, engine, *, served_model_name: str | None = None, metrics: Metrics | None = None,
                 require_cache_salt: bool = False, output: OutputConfig | None = None):
        self.engine = engine
        self.output = output or OutputConfig()   # tool-call and reasoning parsers (serving/openai/chat_output.py)
        self.require_cache_salt = bool(require_cache_salt)
        self.vocab_size = engine_vocab_size(engine) or None
        self.model_name, self.accepted_models = served_names(engine, served_model_name)
        self.max_model_len = int(getattr(engine, "max_model_len", 0) or 0)
        self.created = int(time.time())
        self.delivery_timeout = float(getattr(engine, "delivery_timeout", 120.0))  # see serving/openai/api/delivery.py

        self.metrics, self.engine_observes = bind_metrics(engine, metrics)
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
        """A result that ended in error or abort is answered as an error (serving/openai/errors.py)."""
        return finish_error(result)

    def check_model(self, name: str | None):
        check_model(name, self.accepted_models, self.model_name)

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
    async def _internal(request: Request, exc: Exception):  # answered outside every middleware
        resp = ctx.error_response(as_api_error(exc))
        resp.headers[HEADER] = request_id_of(request.scope)
        return resp
