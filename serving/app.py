"""The OpenAI-compatible HTTP server around a `serving.Engine` (steps 1 and 6 of docs/design.md).

`create_app(engine)` returns a FastAPI app wiring one router per API (serving/openai/api/):

* `POST /v1/chat/completions` (plus the extras `conversation_id`, `cache_salt`, `top_k`, `min_p`,
  `stop_token_ids`, `ignore_eos`), streamed as OpenAI SSE chunks or not (openai/api/chat.py);
* `POST /v1/completions` (a prompt string or a list of token ids; with `conversation_id` + `cache_salt` the
  prompt continues that conversation's committed tokens, no chat template) (openai/api/completions.py);
* `POST /v1/responses`, `GET|DELETE /v1/responses/{id}`: the Responses API with `previous_response_id` chains,
  stored in a bounded `ResponsesStore` (openai/api/responses.py, serving/responses_store.py, docs/server.md);
* `GET|DELETE /v1/conversations/{conversation_id}` (`cache_salt` as the `X-Cache-Salt` header or query parameter;
  an unknown id and a wrong salt both answer 404) (openai/api/conversations.py);
* `GET /v1/models`, `GET /health`, `GET /version`, `GET /metrics` (Prometheus), `POST /tokenize`,
  `POST /detokenize` (openai/api/admin.py).

Every request body is validated by the models of serving/openai/ (the one place of the rules and limits,
shared with the batch job). Every error is answered as OpenAI's body `{"error": {"message", "type", "param",
"code"}}` with its status: 400 validation (never FastAPI's 422), 401 auth, 404 unknown route / model /
conversation / response, 405, 408 body not received in time, 409 busy conversation, 413 body too large, 429
overloaded, 500 internal (a repeated singleton header or query parameter is 400 too; the request-head timeout's
408 and the connection cap's 503 come from below the app: serving/openai/api/http_limits.py). The engine's blocking
calls run in worker threads; a client that disconnects aborts its request, so the turn is discarded (invariant
I3). Every response carries an `x-request-id` header (openai/api/request_id.py). The guard (API key, body size,
body read timeout: openai/api/guard.py), the error handlers
(openai/api/common.py), the engine pump (openai/api/pump.py) and the SSE writer (openai/api/sse.py) are shared.
"""
from __future__ import annotations

from fastapi import FastAPI

from serving.metrics import Metrics
from serving.openai.api import admin, chat, completions, conversations, responses
from serving.openai.api.common import ServerContext, __version__, install_error_handlers
from serving.openai.api.delivery import TransportTap
from serving.openai.api.guard import (DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_BODY_TIMEOUT, Guard,
                                      install_log_redaction)
from serving.openai.api.request_id import RequestId
from serving.openai.chat_output import OutputConfig
from serving.openai.errors import openai_error
from serving.responses_store import DEFAULT_MAX_STORED_RESPONSES, ResponsesStore

__all__ = ["create_app", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_REQUEST_BODY_TIMEOUT", "openai_error"]


def create_app(engine, *, api_key: str | None = None, served_model_name: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, metrics: Metrics | None = None,
               responses_store: ResponsesStore | None = None,
               max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES,
               request_body_timeout: float = DEFAULT_REQUEST_BODY_TIMEOUT, require_cache_salt: bool = False,
               tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> FastAPI:
    """The OpenAI-compatible server of `engine` (see the module docstring). `responses_store` holds the stored
    responses (a new one of `max_stored_responses` when None; pass one to save and load it across restarts).
    `request_body_timeout`: seconds to receive a request body (408 after); `require_cache_salt`: refuse requests
    that carry a conversation_id or previous_response_id without a cache_salt (docs/server.md);
    `tool_call_parser` / `reasoning_parser`: how chat outputs are read (serving/openai/parsers; the tool-call format
    defaults to the chat template's)."""
    output = OutputConfig.create(tool_call_parser, reasoning_parser, getattr(engine.tokenizer, "chat_template", None))
    ctx = ServerContext(engine, served_model_name=served_model_name, metrics=metrics,
                        require_cache_salt=require_cache_salt, output=output)
    install_log_redaction()
    store = responses_store if responses_store is not None else ResponsesStore(max_stored_responses)

    app = FastAPI(title="hybrid-serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.responses = engine, ctx.metrics, store
    install_error_handlers(app, ctx)
    app.add_middleware(Guard, api_key=api_key, max_request_bytes=int(max_request_bytes),
                       on_error=ctx.metrics.count_error, body_timeout=float(request_body_timeout))
    app.add_middleware(RequestId)  # outside the guard: its refusals carry the header too
    app.add_middleware(TransportTap)  # outermost: sees the server's own receive (serving/openai/api/delivery.py)
    for r in (chat.router(ctx), completions.router(ctx), responses.router(ctx, store),
              conversations.router(ctx), admin.router(ctx)):
        app.include_router(r)
    return app
