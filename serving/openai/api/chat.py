"""`POST /v1/chat/completions`, streamed as OpenAI SSE chunks or not: n choices over one computation of the
prompt, tool calls, structured outputs and reasoning content (serving/openai/chat_output.py reads the output),
plus the extras `conversation_id`, `cache_salt`, `top_k`, `min_p`, `stop_token_ids`, `ignore_eos` and vLLM's
`repetition_penalty`, `min_tokens`, `structured_outputs`, `chat_template_kwargs`."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.openai import bodies
from serving.openai.api.common import ServerContext
from serving.openai.api.delivery import DeliveringJSONResponse
from serving.openai.api.pump import PumpGroup
from serving.openai.api.sse import DONE, StreamUsage, sse, sse_response
from serving.openai.chat_output import ChoiceOutput, choice, finish_reason, plan_chat, seen_message
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
        reply = _Reply(ctx, body, group, outs, bodies.completion_id(), int(time.time()), model_name)
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
            return DeliveringJSONResponse(reply.whole(results), group)
        return sse_response(ctx, group, firsts, t0, reply)

    return r


class _Reply:
    """The body of one chat completion: whole, or as SSE chunks (its SSEForm, serving/openai/api/sse.py)."""

    def __init__(self, ctx: ServerContext, body, group: PumpGroup, outs: list[ChoiceOutput], rid: str, created: int,
                 model: str):
        self.ctx, self.body, self.group, self.outs = ctx, body, group, outs
        self.rid, self.created, self.model = rid, created, model
        self.usage = StreamUsage(body.stream_options, group)

    def _logprobs(self, tls):
        return {"content": self.ctx.lp_fmt.chat(tls or [])} if self.body.logprobs else None

    def whole(self, results) -> dict:
        choices = [choice(out, res, self._logprobs(res.logprobs)) for out, res in zip(self.outs, results)]
        for pump, c, res in zip(self.group.pumps, choices, results):
            pump.seen = seen_message(c["message"])
            self.ctx.metrics.count_request("chat", res.finish_reason)
        return bodies.chat_completion(choices, results, model=self.model, request_id=self.rid,
                                      created=self.created)

    def _chunk(self, index: int, delta: dict, finish=None, logprobs=None) -> dict:
        c = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        return self.usage.stamp(c, index)

    # ------------------------------------------------------------------ SSEForm
    def opening(self):
        return [sse(self._chunk(out.index, {"role": "assistant", "content": ""})) for out in self.outs]

    def delta(self, index: int, d):
        self.usage.count(index, d)
        delta = self.outs[index].feed(d.text)
        lp = self._logprobs(d.logprobs) if self.body.logprobs and d.logprobs else None
        return [sse(self._chunk(index, delta, logprobs=lp))] if delta or lp is not None else []

    def finished(self, index: int, result):
        out = self.outs[index]
        self.usage.finish(index, result)
        delta = out.finish()
        msg = out.streamed_message()
        self.group.pumps[index].seen = seen_message(msg)
        self.ctx.metrics.count_request("chat", result.finish_reason)
        return [sse(self._chunk(index, delta, finish=finish_reason(result.finish_reason, msg)))]

    def closing(self, results):
        if self.usage.include:
            yield sse({"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [], "usage": bodies.usage_of_choices(results)})
        yield DONE

    def error(self, err, result):
        self.group.fail()
        return [self.ctx.error_event(err), DONE]
