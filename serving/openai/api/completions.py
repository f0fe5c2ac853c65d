"""`POST /v1/completions`: a prompt string or a list of token ids; with `conversation_id` + `cache_salt` the
prompt continues that conversation's committed tokens (no chat template)."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.openai import bodies
from serving.openai.api.common import ServerContext
from serving.openai.api.delivery import DeliveringJSONResponse
from serving.openai.api.pump import PumpGroup
from serving.openai.api.sse import DONE, StreamUsage, sse, sse_response
from serving.openai.requests import CompletionRequest


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine = ctx.engine

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
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        pump, t0 = await ctx.start(engine.complete_stream, body.prompt, conversation_id=conversation_id,
                                   cache_salt=cache_salt, **sampling)
        reply = _Reply(ctx, body, PumpGroup([pump]), t0, rid, created)
        first = await ctx.first_event(pump, request)
        if first is None:
            return Response(status_code=499)
        if body.stream:
            return sse_response(ctx, reply.group, [first], t0, reply)
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
        ctx.metrics.count_request("completions", result.finish_reason)
        return DeliveringJSONResponse(reply.whole(result), pump)

    return r


class _Reply:
    """The body of one text completion: whole, or as SSE chunks (its SSEForm, serving/openai/api/sse.py)."""

    def __init__(self, ctx: ServerContext, body: CompletionRequest, group: PumpGroup, t0: float, rid: str,
                 created: int):
        self.ctx, self.body, self.group, self.t0 = ctx, body, group, t0
        self.want_lp = body.logprobs is not None
        self.base = {"id": rid, "object": "text_completion", "created": created, "model": ctx.model_name}
        self.offset = 0   # text streamed so far (the logprobs' text_offset)
        self.usage = StreamUsage(body.stream_options, group)

    def whole(self, result) -> dict:
        lp = self.ctx.lp_fmt.completion(result.logprobs or [], 0) if self.want_lp else None
        return dict(self.base, choices=[{"index": 0, "text": result.text, "logprobs": lp,
                                         "finish_reason": result.finish_reason}],
                    usage=bodies.usage(result))

    def _chunk(self, text, finish_reason=None, logprobs=None) -> dict:
        c = dict(self.base, choices=[{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])
        return self.usage.stamp(c, 0)

    # ------------------------------------------------------------------ SSEForm
    def opening(self):
        return []

    def delta(self, index: int, d):
        self.usage.count(index, d)
        lp = None
        if self.want_lp and d.logprobs:
            lp = self.ctx.lp_fmt.completion(d.logprobs, self.offset)
        self.offset += len(d.text)
        if not d.text and lp is None:
            return []
        return [sse(self._chunk(d.text, logprobs=lp))]

    def finished(self, index: int, result):
        self.usage.finish(index, result)
        self.ctx.metrics.count_request("completions", result.finish_reason)
        return [sse(self._chunk("", finish_reason=result.finish_reason))]

    def closing(self, results):
        if self.usage.include:
            yield sse(dict(self.base, choices=[], usage=bodies.usage(results[0])))
        yield DONE

    def error(self, err, result):
        self.group.fail()
        yield self.ctx.error_event(err)
        if result is not None:
            self.ctx.metrics.count_request("completions", result.finish_reason)
            self.ctx.observe_e2e(self.t0)
        yield DONE
