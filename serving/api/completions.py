"""`POST /v1/completions`: a prompt string or a list of token ids; with `conversation_id` + `cache_salt` the
prompt continues that conversation's committed tokens (no chat template)."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import openai_format
from serving.api.common import DeliveringJSONResponse, ServerContext
from serving.openai.requests import CompletionRequest


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine, metrics, lp_fmt, model_name = ctx.engine, ctx.metrics, ctx.lp_fmt, ctx.model_name

    @r.post("/v1/completions")
    async def completions(request: Request):
        body = await ctx.parse(request, CompletionRequest)  # token ids checked against the vocabulary there
        ctx.check_model(body.model)
        sampling = body.sampling(body.max_tokens)
        if body.logprobs is not None:
            sampling.update(logprobs=True, top_logprobs=body.logprobs)
        conversation_id = ctx.conversation_id(request, body.conversation_id)
        cache_salt = ctx.salt(request, body.cache_salt,
                              id_param="conversation_id" if conversation_id is not None else None)
        rid = "cmpl-" + uuid.uuid4().hex
        now = int(time.time())
        pump, t0 = await ctx.start(engine.complete_stream, body.prompt, conversation_id=conversation_id,
                                   cache_salt=cache_salt, **sampling)
        first = await ctx.first_event(pump, request)
        if first is None:
            return Response(status_code=499)
        include_usage = body.include_usage
        want_lp = body.logprobs is not None

        if not body.stream:
            try:
                result = await ctx.collect(pump, request, first)
            finally:
                pump.abort()
            if result is None:
                return Response(status_code=499)
            err = ctx.finish_error(result)
            if err is not None:
                return ctx.error_response(err)
            ctx.observe_e2e(t0)
            metrics.count_request("completions", result.finish_reason)
            lp = lp_fmt.completion(result.logprobs or [], 0) if want_lp else None
            return DeliveringJSONResponse({
                "id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": result.text, "logprobs": lp, "finish_reason": result.finish_reason}],
                "usage": openai_format.usage(result)}, pump)

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
            return dict(base, choices=[], usage=openai_format.usage(result)) if include_usage else None

        return ctx.sse_response(ctx.stream_events(pump, first, t0, make_chunk, make_final, usage_chunk,
                                                  "completions"), pump)

    return r
