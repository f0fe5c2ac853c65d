"""The Responses API: `POST /v1/responses`, `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}` (docs/server.md).

A request is turned into chat messages, [instructions as a system message] + the history of its
`previous_response_id` chain + its own input items, and generated with `engine.chat_stream(messages,
conversation_id=None, cache_salt=...)`: the engine finds the deepest committed state whose tokens prefix the
rendered prompt (the token-addressed checkpoints), so a chain is cached however it is continued. A completed
response is stored (unless `store` is false) in the app's `ResponsesStore` under its `cache_salt`.

Fields either change nothing in the output (accepted, ignored or echoed), are supported, or are refused with 400:
a field that would change the output is never ignored.
"""
from __future__ import annotations

import itertools
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.openai.api.common import ServerContext, query_salt
from serving.openai.api.delivery import DeliveringJSONResponse
from serving.openai.api.pump import PumpGroup
from serving.openai.api.sse import sse, sse_response
from serving.openai.errors import APIError
from serving.openai.responses_request import ResponsesRequest
from serving.responses_store import ResponsesStore

_ROLES = {"user", "system", "developer", "assistant"}
_TEXT_PARTS = {"input_text", "output_text"}


def input_messages(inp) -> list[dict]:
    """The chat messages of a request's `input`: a string is one user message; items are messages (EasyInput or
    typed `message` items, an earlier output message included) with string content or text parts."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not inp:
        raise APIError(400, "input must be a non-empty string or list of items", param="input", code="invalid_value")
    out = []
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object", param=where, code="invalid_value")
        kind = item.get("type", "message")
        if kind != "message":
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported (only messages)",
                           param=f"{where}.type", code="invalid_value")
        role = item.get("role")
        if role not in _ROLES:
            raise APIError(400, f"{where}.role must be one of {sorted(_ROLES)}", param=f"{where}.role",
                           code="invalid_value")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(400, f"{pw}: content of type {kind!r} is not supported (only input_text and "
                                        "output_text)", param=pw, code="invalid_value")
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{pw}.text must be a string", param=f"{pw}.text", code="invalid_value")
                texts.append(part["text"])
            text = "".join(texts)
        else:
            raise APIError(400, f"{where}.content must be a string or a list of text parts",
                           param=f"{where}.content", code="invalid_value")
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _usage(result) -> dict:
    p, c = int(result.prompt_tokens), int(result.completion_tokens)
    return {"input_tokens": p, "input_tokens_details": {"cached_tokens": int(result.cached_tokens)},
            "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c}


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


def not_found(rid: str, param: str | None = None) -> APIError:
    # The same answer for an unknown, deleted, evicted, unstored or another tenant's response.
    what = "previous response" if param == "previous_response_id" else "response"
    return APIError(404, f"{what} {rid!r} not found", param=param, code="response_not_found")


def router(ctx: ServerContext, store: ResponsesStore) -> APIRouter:
    r = APIRouter()
    engine = ctx.engine

    @r.post("/v1/responses")
    async def create_response(request: Request):
        body = await ctx.parse(request, ResponsesRequest)
        ctx.check_model(body.model)
        salt = ctx.salt(request, body.cache_salt,
                        id_param="previous_response_id" if body.previous_response_id is not None else None)
        new_msgs = input_messages(body.input)
        prev = None
        if body.previous_response_id is not None:
            prev = store.get(body.previous_response_id, salt)
            if prev is None:
                raise not_found(body.previous_response_id, "previous_response_id")
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions is not None else []) \
            + (prev.history() if prev is not None else []) + new_msgs
        reply = _Reply(ctx, body, store, salt, prev, new_msgs)

        pump, t0 = await ctx.start(engine.chat_stream, messages, conversation_id=None, cache_salt=salt,
                                   **body.sampling())
        first = await ctx.first_event(pump, request)
        if first is None:
            return Response(status_code=499)
        if body.stream:
            return sse_response(ctx, PumpGroup([pump]), [first], t0, reply)
        try:
            result = await ctx.collect(pump, request, first)
        finally:
            pump.abort()  # a no-op once finished; otherwise (error, cancellation) discard the turn
        if result is None:
            return Response(status_code=499)  # client gone; the turn was aborted and nothing is stored
        err = ctx.finish_error(result)
        if err is not None:
            return ctx.error_response(err)
        obj = reply.final(result)
        ctx.observe_e2e(t0)
        return DeliveringJSONResponse(obj, pump)

    @r.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        salt = query_salt(request)
        if request.query_params.get("stream", "false").lower() not in ("false", "0", ""):
            raise APIError(400, "streaming a stored response is not supported", param="stream",
                           code="invalid_value")
        item = store.get(response_id, salt)
        if item is None:
            raise not_found(response_id)
        return item.response

    @r.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        salt = query_salt(request)
        if not store.delete(response_id, salt):
            raise not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    return r


class _Reply:
    """One response object: whole, or as the Responses API's stream events (its SSEForm, serving/openai/api/sse.py). A
    completed response is stored (unless `store` is false)."""

    def __init__(self, ctx: ServerContext, body: ResponsesRequest, store: ResponsesStore, salt: str | None, prev,
                 new_msgs: list[dict]):
        self.ctx, self.body, self.store, self.salt, self.prev, self.new_msgs = ctx, body, store, salt, prev, new_msgs
        self.rid, self.msg_id = _new_id("resp_"), _new_id("msg_")
        self.created = int(time.time())
        self.store_it = body.store is not False
        self.seq = itertools.count()
        self.loc = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}

    def base(self, status: str, output: list, usage: dict | None, incomplete: dict | None = None,
             error: dict | None = None) -> dict:
        body = self.body
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": error, "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": self.ctx.model_name, "output": output,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default", "store": self.store_it,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": body.tool_choice or "auto",
            "tools": [], "top_logprobs": body.top_logprobs or 0,
            "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": usage,
            "user": body.user, "safety_identifier": body.safety_identifier,
            "prompt_cache_key": body.prompt_cache_key, "metadata": dict(body.metadata or {}),
            "background": False}

    def text_part(self, text: str, lps) -> dict:
        return {"type": "output_text", "text": text, "annotations": [],
                "logprobs": self.ctx.lp_fmt.chat(lps or []) if self.body.want_logprobs else []}

    def message(self, status: str, content: list) -> dict:
        return {"id": self.msg_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def final(self, result) -> dict:
        """The finished response, stored (unless `store` is false) and counted."""
        done = result.finish_reason != "length"
        msg = self.message("completed" if done else "incomplete", [self.text_part(result.text, result.logprobs)])
        obj = self.base("completed" if done else "incomplete", [msg], _usage(result),
                        None if done else {"reason": "max_output_tokens"})
        if self.store_it:
            self.store.add(self.rid, self.salt, obj, self.prev,
                           self.new_msgs + [{"role": "assistant", "content": result.text}])
        self.ctx.metrics.count_request("responses", result.finish_reason)
        return obj

    # ------------------------------------------------------------------ SSEForm
    def _event(self, obj: dict) -> str:
        obj["sequence_number"] = next(self.seq)
        return sse(obj, obj["type"])

    def opening(self):
        started = self.base("in_progress", [], None)
        yield self._event({"type": "response.created", "response": started})
        yield self._event({"type": "response.in_progress", "response": started})
        yield self._event({"type": "response.output_item.added", "output_index": 0,
                           "item": self.message("in_progress", [])})
        yield self._event({"type": "response.content_part.added", **self.loc, "part": self.text_part("", [])})

    def delta(self, index: int, d):
        lps = self.ctx.lp_fmt.chat(d.logprobs) if self.body.want_logprobs and d.logprobs else []
        if d.text or lps:
            yield self._event({"type": "response.output_text.delta", **self.loc, "delta": d.text, "logprobs": lps})

    def finished(self, index: int, result):
        obj = self.final(result)
        msg = obj["output"][0]
        part = msg["content"][0]
        yield self._event({"type": "response.output_text.done", **self.loc, "text": part["text"],
                           "logprobs": part["logprobs"]})
        yield self._event({"type": "response.content_part.done", **self.loc, "part": part})
        yield self._event({"type": "response.output_item.done", "output_index": 0, "item": msg})
        kind = "response.completed" if obj["status"] == "completed" else "response.incomplete"
        yield self._event({"type": kind, "response": obj})

    def closing(self, results):
        return []

    def error(self, err: APIError, result):
        if result is not None:
            self.ctx.metrics.count_request("responses", result.finish_reason)
        self.ctx.metrics.count_error(err.status)
        obj = self.base("failed", [], None, error={"code": "server_error", "message": err.message})
        yield self._event({"type": "response.failed", "response": obj})
