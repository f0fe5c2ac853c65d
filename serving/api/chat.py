"""`POST /v1/chat/completions` (plus the extras `conversation_id`, `cache_salt`, `top_k`, `min_p`,
`stop_token_ids`, `ignore_eos`), streamed as OpenAI SSE chunks or not."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import openai_format
from serving.api.common import DeliveringJSONResponse, ServerContext, sse
from serving.protocol import ChatCompletionRequest


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine, metrics, lp_fmt, model_name = ctx.engine, ctx.metrics, ctx.lp_fmt, ctx.model_name

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await ctx.parse(request, ChatCompletionRequest)
        ctx.check_model(body.model)
        messages = [m.to_engine() for m in body.messages]
        cache_salt = ctx.salt(request, body.cache_salt,
                              id_param="conversation_id" if body.conversation_id is not None else None)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = body.sampling(max_tokens)
        if body.logprobs:
            sampling.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
        rid = openai_format.completion_id()
        now = int(time.time())
        pump, t0 = await ctx.start(engine.chat_stream, messages, conversation_id=body.conversation_id,
                                   cache_salt=cache_salt, **sampling)
        first = await ctx.first_event(pump, request)
        if first is None:
            return Response(status_code=499)
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
        include_usage = body.include_usage

        if not body.stream:
            try:
                result = await ctx.collect(pump, request, first)
            finally:
                pump.abort()  # a no-op once finished; otherwise (error, cancellation) discard the turn
            if result is None:
                return Response(status_code=499)  # client gone; the turn was aborted
            err = ctx.finish_error(result)
            if err is not None:
                return ctx.error_response(err)
            ctx.observe_e2e(t0)
            metrics.count_request("chat", result.finish_reason)
            logprobs = {"content": lp_fmt.chat(result.logprobs or [])} if body.logprobs else None
            return DeliveringJSONResponse(openai_format.chat_completion(
                result, model=model_name, request_id=rid, created=now, logprobs=logprobs), pump)

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
            return dict(base, choices=[], usage=openai_format.usage(result)) if include_usage else None

        async def gen():
            yield sse(chunk(role=True))
            async for s in ctx.stream_events(pump, first, t0, make_chunk, make_final, usage_chunk, "chat"):
                yield s

        return ctx.sse_response(gen(), pump)

    return r
