"""The HTTP routes of the server, one module per API, each a `router(ctx)` over a shared `ServerContext`
(serving/openai/api/common.py); `serving.app.create_app` wires them.

* chat.py           POST /v1/chat/completions
* completions.py    POST /v1/completions
* responses.py      POST /v1/responses, GET|DELETE /v1/responses/{id} (store: serving/responses_store.py)
* conversations.py  GET|DELETE /v1/conversations/{conversation_id}
* admin.py          /v1/models, /tokenize, /detokenize, /health, /version, /metrics

What they share: common.py (`ServerContext`, the error handlers), guard.py (API key, body size and time), pump.py
(the engine's events into asyncio), sse.py (the one SSE writer), delivery.py (when an answer was delivered),
http_limits.py (below the app: the request head's time, the connection cap).
"""
