"""The conversation frontend of a turn: validating messages and ids, and rendering a turn's prompt against the
committed history (only the new messages are rendered when the history matches)."""
from __future__ import annotations

import json

from serving.chat_template import render_continuation
from serving.conversations import Conversation
from serving.errors import BadRequest
from serving.request import Request

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_ID_LEN = 256


def chat_request(tok, rid: str, msgs, sp, salt, render: dict | None = None) -> Request:
    """A request without a conversation id: the whole history rendered; the cache finds its state by tokens.
    render: template variables (tools, chat_template_kwargs)."""
    render = render or {}
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **render)
    return Request(rid, list(ids), sp, salt=salt, boundaries=_boundaries(tok, msgs, ids, render))


def conversation_request(tok, rid: str, key, conv: Conversation | None, msgs, sp,
                         render: dict | None = None) -> Request:
    """The request of a conversation turn. The client sends either only the new messages, or the whole history:
    a resent committed history is recognised and only the new messages are rendered after the committed ids;
    a history that differs from the committed one (it holds assistant messages: an edit, a fork, a regenerate)
    is rendered whole and the cache matches it by tokens, never appending it to the old state."""
    new = msgs
    if conv is not None:
        k = len(conv.messages)
        head = _without_reasoning(msgs[:k])
        if head == _without_reasoning(conv.messages) or head == _without_reasoning(conv.seen or []):
            # the client resent the whole history
            new = msgs[k:]
            if not new:
                raise BadRequest("no new messages after the committed history", param="messages")
        elif any(m["role"] == "assistant" for m in msgs):
            new = None                                        # an edited history
    render = render or {}
    ids = cont = None
    if conv is not None and new is not None:
        all_msgs, seen = conv.messages + new, (conv.seen or conv.messages) + new
        cont = render_continuation(tok, conv.messages, new, committed_ids=conv.ids, **render)
    else:
        all_msgs = seen = msgs
    if cont is not None:
        ids = list(conv.ids) + list(cont)
        nogen = render_continuation(tok, conv.messages, new, add_generation_prompt=False, committed_ids=conv.ids,
                                    **render)
        end = _prefix_len(ids, list(conv.ids) + list(nogen)) if nogen is not None else None
        boundaries = (end,) if end else ()
    else:
        ids = tok.apply_chat_template(all_msgs, add_generation_prompt=True, tokenize=True, **render)
        boundaries = _boundaries(tok, all_msgs, ids, render)
    return Request(rid, list(ids), sp, key=key, salt=key[0], boundaries=boundaries, new_messages=list(all_msgs),
                   new_seen=list(seen))


def _without_reasoning(msgs: list[dict]) -> list[dict]:
    """Histories compare without the assistants' reasoning_content (clients drop it or send it back)."""
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs]


def _boundaries(tok, msgs, ids, render: dict) -> tuple[int, ...]:
    """Where checkpoints are worth taking inside a rendered prompt: the end of the last message (where the
    generation prompt starts: a re-rendered history that rewrites this turn's answer still shares it) and, in
    a conversation's first turn, the end of a leading system message (conversations that open with the same
    system prompt share it)."""
    out = [_prefix_len(ids, tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True, **render))]
    if len(msgs) > 1 and msgs[0]["role"] == "system" and not any(m["role"] == "assistant" for m in msgs):
        out.append(_prefix_len(ids, tok.apply_chat_template(msgs[:1], add_generation_prompt=False, tokenize=True,
                                                            **render)))
    return tuple(sorted({b for b in out if b}))


def _prefix_len(ids, prefix) -> int | None:
    n = len(prefix)
    return n if 0 < n < len(ids) and list(ids[:n]) == list(prefix) else None


def _valid_id(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_ID_LEN and v.isprintable()


def validate_salt(cache_salt) -> str | None:
    if cache_salt is not None and not _valid_id(cache_salt):
        raise BadRequest(f"cache_salt must be 1 to {MAX_ID_LEN} printable characters", param="cache_salt")
    return cache_salt


def conversation_key(conversation_id, cache_salt):
    if not _valid_id(conversation_id):
        raise BadRequest(f"conversation_id must be 1 to {MAX_ID_LEN} printable characters", param="conversation_id")
    return (validate_salt(cache_salt), conversation_id)


def validate_messages(messages) -> list[dict]:
    """Messages in the one form the engine renders, commits and compares: role ("developer" becomes "system"),
    content as text, and where present the assistant's tool_calls ({"id", "type": "function", "function":
    {"name", "arguments" (JSON text)}}), a tool message's tool_call_id, a name and an assistant's
    reasoning_content."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, m) -> dict:
    if not isinstance(m, dict) or "role" not in m:
        raise BadRequest(f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
    role = m["role"]
    if role not in ROLES:
        raise BadRequest(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}", param=f"messages[{i}].role")
    out = {"role": "system" if role == "developer" else role, "content": _text(i, m.get("content", ""))}
    if role == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise BadRequest(f"messages[{i}].tool_calls must be a list", param=f"messages[{i}].tool_calls")
        out["tool_calls"] = [_tool_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(calls)]
    for field in ("tool_call_id", "name", "reasoning_content"):
        v = m.get(field)
        if v is not None:
            if not isinstance(v, str):
                raise BadRequest(f"messages[{i}].{field} must be a string", param=f"messages[{i}].{field}")
            out[field] = v
    return out


def _text(i: int, content) -> str:
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
    return content


def _tool_call(where: str, c) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                         param=where)
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": str(c.get("id") or ""), "type": "function", "function": {"name": fn["name"], "arguments": args}}
