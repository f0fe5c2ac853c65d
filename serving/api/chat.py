"""`POST /v1/chat/completions`, streamed as OpenAI SSE chunks or not: n choices over one computation of the
prompt, tool calls, structured outputs and reasoning content (serving/chat_output.py reads the output), plus the
extras `conversation_id`, `cache_salt`, `top_k`, `min_p`, `stop_token_ids`, `ignore_eos` and vLLM's
`repetition_penalty`, `min_tokens`, `structured_outputs`, `chat_template_kwargs`."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import openai_format
from serving.api.common import DeliveringJSONResponse, PumpGroup, ServerContext, sse
from serving.chat_output import ChoiceOutput, choice, finish_reason, plan_chat, seen_message
from serving.openai.errors import as_api_error
from serving.openai.requests import ChatCompletionRequest


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine, model_name = ctx.engine, ctx.model_name

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await ctx.parse(request, ChatCompletionRequest)
        ctx.check_model(body.model)
        try:
            plan = plan_chat(body, ctx.output)
        except Exception as e:
            raise as_api_error(e) from None
        conversation_id = ctx.conversation_id(request, body.conversation_id)
        cache_salt = ctx.salt(request, body.cache_salt,
                              id_param="conversation_id" if conversation_id is not None else None)
        group, t0 = await ctx.start_many(engine.chat_streams, plan.messages, plan.n,
                                         conversation_id=conversation_id, cache_salt=cache_salt,
                                         template_kwargs=plan.template_kwargs, **plan.sampling)
        firsts = []
        try:
            for pump in group.pumps:
                ev = await ctx.first_event(pump, request)
                if ev is None:
                    group.abort()
                    return Response(status_code=499)
                firsts.append(ev)
        except BaseException:
            group.abort()
            group.settle(False)  # one choice failed: every choice's state is released now
            raise
        outs = [ChoiceOutput(plan, p.handle.prompt_tail(), i) for i, p in enumerate(group.pumps)]
        reply = _Reply(ctx, body, openai_format.completion_id(), int(time.time()), model_name)
        if not body.stream:
            try:
                results = [await ctx.collect(p, request, ev) for p, ev in zip(group.pumps, firsts)]
            finally:
                group.abort()  # a no-op once finished; otherwise (error, cancellation) discard the turns
            if any(res is None for res in results):
                return Response(status_code=499)  # client gone; the turns were aborted
            for res in results:
                err = ctx.finish_error(res)
                if err is not None:
                    group.settle(False)  # the other choices' states are released now, not at the timeout
                    return ctx.error_response(err)
            ctx.observe_e2e(t0)
            return DeliveringJSONResponse(reply.whole(group, outs, results), group)
        return ctx.sse_response(reply.stream(group, outs, firsts, t0), group)

    return r


class _Reply:
    """The body of one chat completion: whole, or as SSE chunks."""

    def __init__(self, ctx: ServerContext, body, rid: str, created: int, model: str):
        self.ctx, self.body, self.rid, self.created, self.model = ctx, body, rid, created, model

    def _logprobs(self, tls):
        return {"content": self.ctx.lp_fmt.chat(tls or [])} if self.body.logprobs else None

    def whole(self, group: PumpGroup, outs: list[ChoiceOutput], results) -> dict:
        choices = [choice(out, res, self._logprobs(res.logprobs)) for out, res in zip(outs, results)]
        for pump, c, res in zip(group.pumps, choices, results):
            pump.seen = seen_message(c["message"])
            self.ctx.metrics.count_request("chat", res.finish_reason)
        return openai_format.chat_completion(choices, results, model=self.model, request_id=self.rid,
                                             created=self.created)

    def _chunk(self, index: int, delta: dict, finish=None, logprobs=None) -> dict:
        c = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if self.body.include_usage:
            c["usage"] = None
        return c

    async def stream(self, group: PumpGroup, outs: list[ChoiceOutput], firsts, t0):
        ctx, results = self.ctx, [None] * len(outs)
        try:
            for out in outs:
                yield sse(self._chunk(out.index, {"role": "assistant", "content": ""}))
            async for i, kind, val in group.merged(firsts):
                out = outs[i]
                if kind == "delta":
                    delta = out.feed(val.text)
                    lp = self._logprobs(val.logprobs) if self.body.logprobs and val.logprobs else None
                    if delta or lp is not None:
                        yield sse(self._chunk(i, delta, logprobs=lp))
                    continue
                err = ctx.finish_error(val) if kind == "done" else as_api_error(val)
                if err is not None:
                    group.fail()
                    yield ctx.error_event(err)
                    yield "data: [DONE]\n\n"
                    return
                results[i] = val
                group.pumps[i].finished = True
                delta = out.finish()
                msg = out.streamed_message()
                group.pumps[i].seen = seen_message(msg)
                ctx.metrics.count_request("chat", val.finish_reason)
                yield sse(self._chunk(i, delta, finish=finish_reason(val.finish_reason, msg)))
            ctx.observe_e2e(t0)
            if self.body.include_usage:
                yield sse({"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [], "usage": openai_format.usage_of_choices(results)})
            yield "data: [DONE]\n\n"
        finally:
            group.abort()  # client gone (generator cancelled or closed) before the end: discard the turns (I3)
