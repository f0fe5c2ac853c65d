"""Models, tokenizer and operations: `GET /v1/models[/{name}]`, `POST /tokenize`, `POST /detokenize` (behind the
API key like /v1/*; the tokenizer and the chat template run in a worker thread, off the event loop, and /tokenize
is held to chat's prompt-length rule before it tokenizes, so a huge body costs little: `tokenize_bounded`),
`GET /health`, `GET /version`, `GET /metrics` (Prometheus)."""
from __future__ import annotations

import functools
import logging

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving.errors import PromptTooLong
from serving.openai.api.common import ServerContext, __version__
from serving.openai.api.pump import call
from serving.openai.errors import APIError, as_api_error
from serving.openai.requests import DetokenizeRequest, TokenizeRequest

log = logging.getLogger("serving.app")


def model_card(ctx: ServerContext) -> dict:
    name, engine = ctx.model_name, ctx.engine
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "hybrid-serve",
            "root": getattr(engine, "model_name", name), "parent": None, "max_model_len": ctx.max_model_len,
            "cache_mode": getattr(engine, "cache_mode", None)}


def max_token_chars(tok) -> int | None:
    """The most characters of text one token of `tok` can stand for (None if unknown): a text longer than
    max_model_len times this cannot fit in the context, whatever its tokens. For a `tokenizers` vocabulary, its
    longest token string (a byte-level token has one character per byte it covers, a Metaspace token one per
    character it covers), times 3 when the tokenizer normalizes (NFC composes at most a few characters into
    one); for the byte tokenizer, its longest special token (a byte covers at most one character)."""
    hf = getattr(tok, "hf_tokenizer", None)
    try:
        if hf is not None:
            longest = max(map(len, hf.get_vocab(with_added_tokens=True)), default=0)
            return longest * (3 if hf.normalizer is not None else 1) or None
        specials = getattr(tok, "SPECIAL_TOKENS", None)
        if type(tok).__name__ == "ByteTokenizer" and isinstance(specials, dict):
            return max(map(len, specials), default=1)
    except Exception:  # an unusual tokenizer: no bound before tokenizing, the token count still applies
        log.debug("no characters-per-token bound for %s", type(tok).__name__, exc_info=True)
    return None


def _encode(tok, text: str, add_special_tokens: bool) -> list[int]:
    """`tok.encode`, for a `tokenizers` tokenizer through encode_batch, which releases the GIL (its encode holds
    it for the whole text: seconds for megabytes, every stream frozen meanwhile)."""
    hf = getattr(tok, "hf_tokenizer", None)
    if hf is not None:
        return list(hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
    return [int(t) for t in tok.encode(text, add_special_tokens=add_special_tokens)]


def tokenize_bounded(tok, body: TokenizeRequest, max_model_len: int, token_chars: int | None) -> list[int]:
    """The ids of a /tokenize request (run in a worker thread), held to chat's rule: a prompt of max_model_len
    tokens or more is 400 context_length_exceeded (room is needed for one generated token), refused before
    tokenizing when its text is longer than max_model_len tokens can stand for (`max_token_chars`)."""
    if body.messages is not None:
        param, special = "messages", False  # the template writes the special tokens (as chat renders it)
        text = tok.apply_chat_template([m.to_engine() for m in body.messages],
                                       add_generation_prompt=body.add_generation_prompt, tokenize=False)
    else:
        param, text, special = "prompt", body.prompt, body.add_special_tokens
    limit = f"this model's maximum context length is {max_model_len} tokens"
    if max_model_len and token_chars and len(text) > max_model_len * token_chars:
        raise PromptTooLong(f"{limit}; the prompt has {len(text)} characters, more than {max_model_len} tokens "
                            "can hold", param=param)
    ids = _encode(tok, text, special)
    if max_model_len and len(ids) >= max_model_len:
        raise PromptTooLong(f"{limit}; the prompt has {len(ids)} tokens (room is needed for at least one "
                            "generated token)", param=param)
    return ids


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

    token_chars = functools.cache(lambda: max_token_chars(engine.tokenizer))

    @r.post("/tokenize")
    async def tokenize(request: Request):
        body = await ctx.parse(request, TokenizeRequest)
        try:
            ids = await call(lambda: tokenize_bounded(engine.tokenizer, body, ctx.max_model_len, token_chars()))
        except Exception as e:
            raise as_api_error(e) from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len})

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
