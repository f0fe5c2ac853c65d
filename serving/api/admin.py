"""Models, tokenizer and operations: `GET /v1/models[/{name}]`, `POST /tokenize`, `POST /detokenize` (behind the
API key like /v1/*; the tokenizer and the chat template run in a worker thread, off the event loop),
`GET /health`, `GET /version`, `GET /metrics` (Prometheus)."""
from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving.api.common import ServerContext, __version__, call
from serving.protocol import APIError, DetokenizeRequest, TokenizeRequest, as_api_error


def model_card(ctx: ServerContext) -> dict:
    name, engine = ctx.model_name, ctx.engine
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "hybrid-serve",
            "root": getattr(engine, "model_name", name), "parent": None, "max_model_len": ctx.max_model_len,
            "cache_mode": getattr(engine, "cache_mode", None)}


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine, metrics = ctx.engine, ctx.metrics

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(ctx)]}

    @r.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in ctx.accepted_models:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card(ctx)

    @r.post("/tokenize")
    async def tokenize(request: Request):
        body = await ctx.parse(request, TokenizeRequest)
        tok = engine.tokenizer

        def run():
            if body.messages is not None:
                return tok.apply_chat_template([m.to_engine() for m in body.messages],
                                               add_generation_prompt=body.add_generation_prompt, tokenize=True)
            return tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)

        try:
            ids = await call(run)
        except Exception as e:
            raise as_api_error(e) from None
        ids = [int(t) for t in ids]
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}

    @r.post("/detokenize")
    async def detokenize(request: Request):
        body = await ctx.parse(request, DetokenizeRequest)  # token ids checked against the vocabulary there
        try:
            text = await call(engine.tokenizer.decode, body.tokens, skip_special_tokens=body.skip_special_tokens)
        except Exception as e:
            raise as_api_error(e) from None
        return {"prompt": text}

    @r.get("/health")
    async def health():
        alive = getattr(ctx.engine, "alive", None)
        if alive is not None and not alive():  # the engine loop is gone: nothing would be answered
            return JSONResponse({"status": "engine loop not running"}, status_code=503)
        return {"status": "ok"}

    @r.get("/version")
    async def version():
        return {"version": __version__}

    @r.get("/metrics")
    async def metrics_endpoint():
        data, ctype = await anyio.to_thread.run_sync(metrics.render)
        return Response(content=data, media_type=ctype)

    return r
