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
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.api.common import DeliveringJSONResponse, ServerContext, check_salt, header_salt, query_salt, sse
from serving.protocol import Id, APIError, as_api_error
from serving.responses_store import ResponsesStore

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_NOOP_INCLUDES = {"reasoning.encrypted_content"}  # this server never returns reasoning items
_ROLES = {"user", "system", "developer", "assistant"}
_TEXT_PARTS = {"input_text", "output_text"}

# Fields of OpenAI's request that this server refuses, with the reason (everything else unknown is refused too).
_REFUSED = {
    "conversation": "the conversation field is not supported; continue with previous_response_id",
    "prompt": "prompt templates (the prompt field) are not supported",
    "context_management": "context_management is not supported",
    "prompt_cache_options": "prompt_cache_options is not supported",
    "moderation": "moderation is not supported",
    "image": "image generation options are not supported",
    "background_options": "background responses are not supported",
    "access_programs": "access_programs is not supported",
    "max_tokens": "use max_output_tokens",
    "conversation_id": "conversation_id is not a Responses API field; continue with previous_response_id",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _StreamOptions(_Strict):
    include_obfuscation: bool | None = None  # accepted; this server never pads events


class ResponsesRequest(_Strict):
    """`POST /v1/responses` body. Unknown fields are refused (400), never silently ignored."""
    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    # accepted, no effect on the output (echoed where OpenAI echoes them)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=0)
    # accepted only with the values that change nothing
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    # this server's extras (as in chat completions)
    cache_salt: Id | None = None
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data):
        if isinstance(data, dict):
            for name in data:
                if name in _REFUSED and data[name] is not None:
                    raise ValueError(f"{name}: {_REFUSED[name]}")
            data = {k: v for k, v in data.items() if k not in _REFUSED}  # the rest are null: nothing asked
        return data

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v is not None and v != -1 and v < 1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif v == "":
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 metadata pairs")
            if any(len(k) > 64 or len(x) > 512 for k, x in v.items()):
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: only 'none' and 'auto' are supported (no tools)")
        if self.text is not None:
            extra = set(self.text) - {"format", "verbosity"}
            if extra:
                raise ValueError(f"text.{sorted(extra)[0]} is not supported")
            fmt = self.text.get("format")
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
                raise ValueError("text.format: only {'type': 'text'} is supported")
            if self.text.get("verbosity") not in (None, "medium"):
                raise ValueError("text.verbosity: only 'medium' is supported")
        if self.reasoning is not None:
            for k, v in self.reasoning.items():
                if v is not None and not (k == "effort" and v == "none"):
                    raise ValueError(f"reasoning.{k} is not supported (this server returns no reasoning)")
        if self.truncation == "auto":
            raise ValueError("truncation 'auto' is not supported: a prompt longer than the context is refused")
        if self.background:
            raise ValueError("background responses are not supported")
        for inc in self.include or []:
            if inc != LOGPROBS_INCLUDE and inc not in _NOOP_INCLUDES:
                raise ValueError(f"include {inc!r} is not supported")
        if self.top_logprobs and not self.want_logprobs:
            raise ValueError(f"top_logprobs requires include=[{LOGPROBS_INCLUDE!r}]")
        return self

    @property
    def want_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def sampling(self) -> dict:
        kw = dict(max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p,
                  top_k=self.top_k, min_p=self.min_p, seed=self.seed, stop=self.stop,
                  stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos or None)
        if self.want_logprobs:
            kw.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        return {k: v for k, v in kw.items() if v is not None}


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


def router(ctx: ServerContext, store: ResponsesStore) -> APIRouter:
    r = APIRouter()
    engine, metrics, lp_fmt = ctx.engine, ctx.metrics, ctx.lp_fmt

    def not_found(rid: str, param: str | None = None) -> APIError:
        # The same answer for an unknown, deleted, evicted, unstored or another tenant's response.
        what = "previous response" if param == "previous_response_id" else "response"
        return APIError(404, f"{what} {rid!r} not found", param=param, code="response_not_found")

    @r.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        ctx.check_model(body.model)
        salt = body.cache_salt if body.cache_salt is not None else check_salt(header_salt(request))
        new_msgs = input_messages(body.input)
        prev = None
        if body.previous_response_id is not None:
            prev = store.get(body.previous_response_id, salt)
            if prev is None:
                raise not_found(body.previous_response_id, "previous_response_id")
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions is not None else []) \
            + (prev.history() if prev is not None else []) + new_msgs
        sampling = body.sampling()
        want_lp = body.want_logprobs
        rid, msg_id = _new_id("resp_"), _new_id("msg_")
        created = int(time.time())
        store_it = body.store is not False

        pump, t0 = await ctx.start(engine.chat_stream, messages, conversation_id=None, cache_salt=salt, **sampling)
        first = await ctx.first_event(pump, request)
        if first is None:
            return Response(status_code=499)

        def base(status: str, output: list, usage: dict | None, incomplete: dict | None = None,
                 error: dict | None = None) -> dict:
            return {
                "id": rid, "object": "response", "created_at": created, "status": status,
                "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
                "error": error, "incomplete_details": incomplete, "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "model": ctx.model_name, "output": output,
                "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
                "previous_response_id": body.previous_response_id,
                "reasoning": {"effort": None, "summary": None}, "service_tier": "default", "store": store_it,
                "temperature": 1.0 if body.temperature is None else body.temperature,
                "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": body.tool_choice or "auto",
                "tools": [], "top_logprobs": body.top_logprobs or 0,
                "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": usage,
                "user": body.user, "safety_identifier": body.safety_identifier,
                "prompt_cache_key": body.prompt_cache_key, "metadata": dict(body.metadata or {}),
                "background": False}

        def text_part(text: str, lps) -> dict:
            return {"type": "output_text", "text": text, "annotations": [],
                    "logprobs": lp_fmt.chat(lps or []) if want_lp else []}

        def message(status: str, content: list) -> dict:
            return {"id": msg_id, "type": "message", "status": status, "role": "assistant", "content": content}

        def final(result) -> dict:
            done = result.finish_reason != "length"
            msg = message("completed" if done else "incomplete", [text_part(result.text, result.logprobs)])
            obj = base("completed" if done else "incomplete", [msg], _usage(result),
                       None if done else {"reason": "max_output_tokens"})
            if store_it:
                store.add(rid, salt, obj, prev, new_msgs + [{"role": "assistant", "content": result.text}])
            metrics.count_request("responses", result.finish_reason)
            ctx.observe_e2e(t0)
            return obj

        if not body.stream:
            try:
                result = await ctx.collect(pump, request, first)
            finally:
                pump.abort()  # a no-op once finished; otherwise (error, cancellation) discard the turn
            if result is None:
                return Response(status_code=499)  # client gone; the turn was aborted and nothing is stored
            err = ctx.finish_error(result)
            if err is not None:
                return ctx.error_response(err)
            return DeliveringJSONResponse(final(result), pump)

        seq = itertools.count()

        def event(obj: dict) -> str:
            obj["sequence_number"] = next(seq)
            return sse(obj, obj["type"])

        def failed(err: APIError) -> str:
            metrics.count_error(err.status)
            obj = base("failed", [], None, error={"code": "server_error", "message": err.message})
            return event({"type": "response.failed", "response": obj})

        loc = {"item_id": msg_id, "output_index": 0, "content_index": 0}

        async def gen():
            ev, t_first, t_prev = first, None, None
            try:
                started = base("in_progress", [], None)
                yield event({"type": "response.created", "response": started})
                yield event({"type": "response.in_progress", "response": started})
                yield event({"type": "response.output_item.added", "output_index": 0,
                             "item": message("in_progress", [])})
                yield event({"type": "response.content_part.added", **loc, "part": text_part("", [])})
                while ev is not None:
                    kind, val = ev
                    if kind == "delta":
                        if val.token_ids or val.text:
                            t_first, t_prev = ctx.observe_local(t0, t_first, t_prev, time.perf_counter())
                        lps = lp_fmt.chat(val.logprobs) if want_lp and val.logprobs else []
                        if val.text or lps:
                            yield event({"type": "response.output_text.delta", **loc, "delta": val.text,
                                         "logprobs": lps})
                    elif kind == "done":
                        pump.finished = True
                        err = ctx.finish_error(val)
                        if err is not None:
                            metrics.count_request("responses", val.finish_reason)
                            yield failed(err)
                            return
                        obj = final(val)
                        msg = obj["output"][0]
                        part = msg["content"][0]
                        yield event({"type": "response.output_text.done", **loc, "text": part["text"],
                                     "logprobs": part["logprobs"]})
                        yield event({"type": "response.content_part.done", **loc, "part": part})
                        yield event({"type": "response.output_item.done", "output_index": 0, "item": msg})
                        kind = "response.completed" if obj["status"] == "completed" else "response.incomplete"
                        yield event({"type": kind, "response": obj})
                        return
                    else:  # error after the stream started (the finally aborts the request)
                        yield failed(as_api_error(val))
                        return
                    ev = await pump.next(None)  # disconnects cancel this generator (see finally)
            finally:
                pump.abort()  # client gone before the end: the turn is discarded and nothing is stored (I3)

        return ctx.sse_response(gen(), pump)

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
