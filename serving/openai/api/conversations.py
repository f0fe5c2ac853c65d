"""`GET /v1/conversations` (one salt's conversations) and `GET|DELETE /v1/conversations/{conversation_id}`:
`cache_salt` as the `X-Cache-Salt` header (preferred: query strings end up in access logs) or the `cache_salt`
query parameter; an unknown id and a wrong salt both answer 404. With --require-cache-salt a salt is required."""
from __future__ import annotations

from fastapi import APIRouter, Request

from serving.openai.api.common import ServerContext, query_salt
from serving.openai.api.pump import call
from serving.openai.errors import APIError, as_api_error
from serving.openai.fields import check_id


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine = ctx.engine

    def conversation_args(conversation_id: str, request: Request):
        check_id(conversation_id, "conversation_id")
        salt = query_salt(request)
        ctx.require_salt(salt, "conversation_id")
        return salt

    def not_found(conversation_id):
        # The same answer for an unknown id and for a wrong salt: never reveal another tenant's conversation.
        return APIError(404, f"conversation {conversation_id!r} not found", param="conversation_id",
                        code="conversation_not_found")

    @r.get("/v1/conversations")
    async def list_conversations(request: Request):
        salt = query_salt(request)
        ctx.require_salt(salt, "a conversation listing")
        try:
            data = await call(engine.list_conversations, salt)
        except Exception as e:
            raise as_api_error(e) from None
        return {"object": "list", "data": [{"id": c["conversation_id"], "object": "conversation", **c}
                                           for c in data]}

    @r.get("/v1/conversations/{conversation_id:path}")
    async def get_conversation(conversation_id: str, request: Request):
        salt = conversation_args(conversation_id, request)
        try:
            info = await call(engine.get_conversation, conversation_id, salt)
        except Exception as e:
            raise as_api_error(e) from None
        if info is None:
            raise not_found(conversation_id)
        out = {"id": conversation_id, "object": "conversation"}
        out.update({k: v for k, v in dict(info).items() if k != "cache_salt"})
        return out

    @r.delete("/v1/conversations/{conversation_id:path}")
    async def delete_conversation(conversation_id: str, request: Request):
        salt = conversation_args(conversation_id, request)
        try:
            ok = await call(engine.delete_conversation, conversation_id, salt)
        except Exception as e:
            raise as_api_error(e) from None
        if not ok:
            raise not_found(conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    return r
