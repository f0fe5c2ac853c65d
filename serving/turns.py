"""The conversation frontend of a turn: validating messages and ids, and rendering a turn's prompt against the
committed history (only the new messages are rendered when the history matches)."""
from __future__ import annotations

from serving.conversations import Conversation
from serving.errors import BadRequest
from serving.request import Request
from serving.tokenizer import render_continuation

ROLES = ("system", "user", "assistant", "developer", "tool")
_MAX_ID_LEN = 256


def conversation_request(tok, rid: str, key, conv: Conversation | None, msgs, sp) -> Request:
    """The request of a conversation turn: its prompt ids continue the committed ids when the client sent only
    new messages or resent the committed history; an edited history is re-rendered and recomputed."""
    drop = False
    if conv is None:
        new_msgs, all_msgs = msgs, msgs
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    else:
        k = len(conv.messages)
        if msgs[:k] == conv.messages or msgs[:k] == conv.seen:  # the client resent the whole history
            new_msgs = msgs[k:]
        elif msgs[0] == conv.messages[0] and len(msgs) > 1:
            new_msgs = None                    # an edited or truncated history: a miss
        else:
            new_msgs = msgs
        cont = None
        if new_msgs:
            cont = render_continuation(tok, conv.messages, new_msgs, committed_ids=conv.ids)
        if cont is None:
            all_msgs = msgs if new_msgs is None or not new_msgs else conv.messages + new_msgs
            if new_msgs is not None and not new_msgs:
                raise BadRequest("no new messages after the committed history", param="messages")
            ids = tok.apply_chat_template(all_msgs, add_generation_prompt=True, tokenize=True)
            drop = True
        else:
            all_msgs = conv.messages + new_msgs
            ids = list(conv.ids) + list(cont)
    seen = None if conv is None or drop else (conv.seen or conv.messages) + (new_msgs or [])
    return Request(rid, list(ids), sp, key=key, new_messages=list(all_msgs),
                    new_seen=seen, drop_committed=drop)


def conversation_key(conversation_id, cache_salt):
    if not isinstance(conversation_id, str) or not conversation_id or len(conversation_id) > _MAX_ID_LEN:
        raise BadRequest(f"conversation_id must be a non-empty string of at most {_MAX_ID_LEN} characters",
                         param="conversation_id")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt
                                   or len(cache_salt) > _MAX_ID_LEN):
        raise BadRequest(f"cache_salt must be a non-empty string of at most {_MAX_ID_LEN} characters",
                         param="cache_salt")
    return (cache_salt, conversation_id)


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRequest(f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = m["role"]
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}",
                             param=f"messages[{i}].role")
        content = m.get("content", "")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise BadRequest(f"messages[{i}].content parts must be text parts", param=f"messages[{i}]")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out
