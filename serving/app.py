"""The OpenAI-compatible HTTP server around a `serving.Engine` (step 1 and step 6 of DESIGN.md).

`create_app(engine)` returns a FastAPI app with

* `POST /v1/chat/completions` (plus the extras `conversation_id`, `cache_salt`, `top_k`, `min_p`,
  `stop_token_ids`, `ignore_eos`), streamed as OpenAI SSE chunks or not;
* `POST /v1/completions` (a prompt string or a list of token ids; with `conversation_id` + `cache_salt` the
  prompt continues that conversation's committed tokens, no chat template);
* `GET /v1/models`, `GET|DELETE /v1/conversations/{conversation_id}` (`cache_salt` as query parameter or
  `X-Cache-Salt` header; an unknown id and a wrong salt both answer 404);
* `GET /health`, `GET /version`, `GET /metrics` (Prometheus), `POST /tokenize`, `POST /detokenize`.

Every error is answered as OpenAI's body `{"error": {"message", "type", "param", "code"}}` with its status:
400 validation (never FastAPI's 422), 401 auth, 404 unknown route / model / conversation, 405, 409 busy
conversation, 413 body too large, 429 overloaded, 500 internal. The engine's blocking calls run in worker
threads; a client that disconnects aborts its request, so the turn is discarded (invariant I3).
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from typing import Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import openai_format
from serving.metrics import Metrics
from serving.protocol import (MAX_ID_LEN, APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                              LogprobFormatter, TokenizeRequest, as_api_error, openai_error, validation_error)

__all__ = ["create_app", "DEFAULT_MAX_REQUEST_BYTES", "openai_error"]

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

class _Guard:
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

class _Pump:
    """Iterates a RequestHandle in a daemon thread and posts ("delta", d), ("done", result) or ("error", exc)."""

    def __init__(self, handle):
        self.handle = handle
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
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

    def abort(self):
        if not self.finished:
            self.finished = True
            try:
                self.handle.abort()
            except Exception:
                log.exception("abort failed")


async def _call(fn: Callable, *args, **kwargs):
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


_usage = openai_format.usage


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------

def create_app(engine, *, api_key: str | None = None, served_model_name: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, metrics: Metrics | None = None) -> FastAPI:
    """The OpenAI-compatible server of `engine` (see the module docstring)."""
    model_name = served_model_name or getattr(engine, "model_name", None) or "default"
    accepted_models = {model_name, getattr(engine, "model_name", model_name)}
    max_model_len = int(getattr(engine, "max_model_len", 0) or 0)
    created = int(time.time())

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
    lp_fmt = LogprobFormatter(engine.tokenizer)

    app = FastAPI(title="hybrid-serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    def error_response(err: APIError) -> JSONResponse:
        metrics.count_error(err.status)
        return JSONResponse(openai_error(err.status, err.message, type=err.type, param=err.param, code=err.code),
                            status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc.errors()))

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
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(as_api_error(exc))

    app.add_middleware(_Guard, api_key=api_key, max_request_bytes=int(max_request_bytes),
                       on_error=metrics.count_error)

    def check_model(name: str | None):
        if name and name not in accepted_models:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ generation
    async def start(fn: Callable, *args, **kwargs):
        """Submit to the engine and wait for its first event (errors before any output become a status)."""
        t0 = time.perf_counter()
        try:
            handle = await _call(fn, *args, **kwargs)
        except Exception as e:
            raise as_api_error(e) from None
        pump = _Pump(handle)
        return pump, t0

    async def first_event(pump: _Pump, request: Request):
        ev = await pump.next(request)
        if ev is None:
            return None
        kind, val = ev
        if kind == "error":
            pump.abort()
            raise as_api_error(val)
        if kind == "done" and finish_error(val) is not None:
            pump.finished = True
            raise finish_error(val)
        return ev

    async def collect(pump: _Pump, request: Request, ev):
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

    def observe_local(t0, t_first, t_prev, now):
        if engine_observes:
            return t_first, now
        if t_first is None:
            metrics.observe_ttft(now - t0)
            return now, now
        metrics.observe_itl(now - t_prev)
        return t_first, now

    def finish_error(result) -> APIError | None:
        """A result that ended in error or abort is answered as an error."""
        if result.finish_reason == "error":
            return APIError(500, f"generation failed: {getattr(result, 'error', None) or 'engine error'}",
                            code="generation_error")
        if result.finish_reason == "abort":
            return APIError(503, "the request was aborted", code="aborted")
        return None

    def error_event(err: APIError) -> str:
        metrics.count_error(err.status)
        return _sse(openai_error(err.status, err.message, type=err.type, param=err.param, code=err.code))

    async def stream_events(pump: _Pump, first, t0, make_chunk, make_final, usage_chunk, endpoint: str):
        """SSE body. make_chunk(delta) -> dict | None; make_final(result) -> dict; usage_chunk(result) -> dict|None."""
        ev = first
        t_first = t_prev = None
        try:
            while ev is not None:
                kind, val = ev
                if kind == "delta":
                    if val.token_ids or val.text:
                        t_first, t_prev = observe_local(t0, t_first, t_prev, time.perf_counter())
                    chunk = make_chunk(val)
                    if chunk is not None:
                        yield _sse(chunk)
                elif kind == "done":
                    pump.finished = True
                    err = finish_error(val)
                    if err is not None:
                        yield error_event(err)
                    else:
                        yield _sse(make_final(val))
                        u = usage_chunk(val)
                        if u is not None:
                            yield _sse(u)
                    metrics.count_request(endpoint, val.finish_reason)
                    if not engine_observes:
                        metrics.observe_e2e(time.perf_counter() - t0)
                    yield "data: [DONE]\n\n"
                    return
                else:  # error after the stream started (the finally aborts the request)
                    yield error_event(as_api_error(val))
                    yield "data: [DONE]\n\n"
                    return
                ev = await pump.next(None)  # disconnects cancel this generator (see finally)
        finally:
            # Client gone (generator cancelled or closed) before the end: discard the turn (I3).
            pump.abort()

    def sse_response(gen, pump: _Pump) -> StreamingResponse:
        return _AbortingStreamingResponse(gen, pump)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [m.to_engine() for m in body.messages]
        cache_salt = body.cache_salt
        if cache_salt is None:
            cache_salt = _header_salt(request)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = body.sampling(max_tokens)
        if body.logprobs:
            sampling.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
        rid = openai_format.completion_id()
        now = int(time.time())
        pump, t0 = await start(engine.chat_stream, messages, conversation_id=body.conversation_id,
                               cache_salt=cache_salt, **sampling)
        first = await first_event(pump, request)
        if first is None:
            return Response(status_code=499)
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
        include_usage = body.include_usage

        if not body.stream:
            try:
                result = await collect(pump, request, first)
            finally:
                pump.abort()  # a no-op once finished; otherwise (error, cancellation) discard the turn
            if result is None:
                return Response(status_code=499)  # client gone; the turn was aborted
            err = finish_error(result)
            if err is not None:
                return error_response(err)
            if not engine_observes:
                metrics.observe_e2e(time.perf_counter() - t0)
            metrics.count_request("chat", result.finish_reason)
            logprobs = {"content": lp_fmt.chat(result.logprobs or [])} if body.logprobs else None
            return openai_format.chat_completion(result, model=model_name, request_id=rid, created=now,
                                                 logprobs=logprobs)

        def chunk(delta=None, finish_reason=None, logprobs=None, role=False):
            d = {}
            if role:
                d = {"role": "assistant", "content": ""}
            elif delta is not None:
                d = {"content": delta}
            c = dict(base, choices=[{"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}])
            if include_usage:
                c["usage"] = None
            return c

        def make_chunk(d):
            lp = None
            if body.logprobs and d.logprobs:
                lp = {"content": lp_fmt.chat(d.logprobs)}
            if not d.text and lp is None:
                return None
            return chunk(d.text, logprobs=lp)

        def make_final(result):
            return chunk(finish_reason=result.finish_reason)

        def usage_chunk(result):
            return dict(base, choices=[], usage=_usage(result)) if include_usage else None

        async def gen():
            yield _sse(chunk(role=True))
            async for s in stream_events(pump, first, t0, make_chunk, make_final, usage_chunk, "chat"):
                yield s

        return sse_response(gen(), pump)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        sampling = body.sampling(body.max_tokens)
        if body.logprobs is not None:
            sampling.update(logprobs=True, top_logprobs=body.logprobs)
        prompt = body.prompt
        if isinstance(prompt, list):
            vocab = _vocab_size(engine)
            if vocab and any(t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        rid = "cmpl-" + uuid.uuid4().hex
        now = int(time.time())
        conv_kw = {}
        if body.conversation_id is not None:
            cache_salt = body.cache_salt if body.cache_salt is not None else _header_salt(request)
            conv_kw = dict(conversation_id=body.conversation_id, cache_salt=cache_salt)
        pump, t0 = await start(engine.complete_stream, prompt, **conv_kw, **sampling)
        first = await first_event(pump, request)
        if first is None:
            return Response(status_code=499)
        include_usage = body.include_usage
        want_lp = body.logprobs is not None

        if not body.stream:
            try:
                result = await collect(pump, request, first)
            finally:
                pump.abort()
            if result is None:
                return Response(status_code=499)
            err = finish_error(result)
            if err is not None:
                return error_response(err)
            if not engine_observes:
                metrics.observe_e2e(time.perf_counter() - t0)
            metrics.count_request("completions", result.finish_reason)
            lp = lp_fmt.completion(result.logprobs or [], 0) if want_lp else None
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": result.text, "logprobs": lp,
                                 "finish_reason": result.finish_reason}],
                    "usage": _usage(result)}

        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        offset = [0]

        def chunk(text, finish_reason=None, logprobs=None):
            c = dict(base, choices=[{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])
            if include_usage:
                c["usage"] = None
            return c

        def make_chunk(d):
            lp = None
            if want_lp and d.logprobs:
                lp = lp_fmt.completion(d.logprobs, offset[0])
            offset[0] += len(d.text)
            if not d.text and lp is None:
                return None
            return chunk(d.text, logprobs=lp)

        def make_final(result):
            return chunk("", finish_reason=result.finish_reason)

        def usage_chunk(result):
            return dict(base, choices=[], usage=_usage(result)) if include_usage else None

        return sse_response(stream_events(pump, first, t0, make_chunk, make_final, usage_chunk, "completions"), pump)

    # ------------------------------------------------------------------ conversations
    def conversation_args(conversation_id: str, request: Request):
        if not conversation_id or len(conversation_id) > MAX_ID_LEN:
            raise APIError(400, f"conversation_id must be a non-empty string of at most {MAX_ID_LEN} characters",
                           param="conversation_id", code="invalid_value")
        q = request.query_params.get("cache_salt")
        h = _header_salt(request)
        if q is not None and h is not None and q != h:
            raise APIError(400, "cache_salt query parameter and X-Cache-Salt header differ", param="cache_salt",
                           code="invalid_value")
        salt = q if q is not None else h
        if salt is not None and (not salt or len(salt) > MAX_ID_LEN):
            raise APIError(400, f"cache_salt must be a non-empty string of at most {MAX_ID_LEN} characters",
                           param="cache_salt", code="invalid_value")
        return salt

    def not_found(conversation_id):
        # The same answer for an unknown id and for a wrong salt: never reveal another tenant's conversation.
        return APIError(404, f"conversation {conversation_id!r} not found", param="conversation_id",
                        code="conversation_not_found")

    @app.get("/v1/conversations/{conversation_id:path}")
    async def get_conversation(conversation_id: str, request: Request):
        salt = conversation_args(conversation_id, request)
        try:
            info = await _call(engine.get_conversation, conversation_id, salt)
        except Exception as e:
            raise as_api_error(e) from None
        if info is None:
            raise not_found(conversation_id)
        out = {"id": conversation_id, "object": "conversation"}
        out.update({k: v for k, v in dict(info).items() if k != "cache_salt"})
        return out

    @app.delete("/v1/conversations/{conversation_id:path}")
    async def delete_conversation(conversation_id: str, request: Request):
        salt = conversation_args(conversation_id, request)
        try:
            ok = await _call(engine.delete_conversation, conversation_id, salt)
        except Exception as e:
            raise as_api_error(e) from None
        if not ok:
            raise not_found(conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    # ------------------------------------------------------------------ models, tokenizer, ops
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, engine, created, max_model_len)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in accepted_models:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return _model_card(model_name, engine, created, max_model_len)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tok = engine.tokenizer
        try:
            if body.messages is not None:
                ids = tok.apply_chat_template([m.to_engine() for m in body.messages],
                                              add_generation_prompt=body.add_generation_prompt, tokenize=True)
            else:
                ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except Exception as e:
            raise as_api_error(e) from None
        ids = [int(t) for t in ids]
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        vocab = _vocab_size(engine)
        if vocab and any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint():
        data, ctype = await anyio.to_thread.run_sync(metrics.render)
        return Response(content=data, media_type=ctype)

    return app


class _AbortingStreamingResponse(StreamingResponse):
    """An SSE response that aborts its request however the response ends early: client disconnect (the stream
    task is cancelled, possibly before the body generator ever started), a failed send, or an error. After a
    complete stream the abort is a no-op."""

    def __init__(self, content, pump: _Pump):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.pump = pump

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.pump.abort()


def _header_salt(request: Request) -> str | None:
    return request.headers.get("x-cache-salt")


def _vocab_size(engine) -> int:
    cfg = getattr(engine, "cfg", None)
    v = getattr(cfg, "vocab_size", None) or getattr(engine.tokenizer, "vocab_size", 0)
    return int(v or 0)


def _model_card(name, engine, created, max_model_len) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "hybrid-serve",
            "root": getattr(engine, "model_name", name), "parent": None, "max_model_len": max_model_len,
            "cache_mode": getattr(engine, "cache_mode", None)}
