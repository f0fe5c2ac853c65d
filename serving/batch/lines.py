"""The input lines of a batch (`parse_lines`: each checked as a line of the OpenAI batch format, its conversation
group, a line-level error attached), the record of an error in the output (`error_record`, in the server's error
shape, serving/openai/errors.py), and what an earlier run left in the output (`read_done`)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from typing import Any

from serving.openai.errors import APIError, openai_error

log = logging.getLogger("serving.batch")

CHAT_URL = "/v1/chat/completions"


@dataclasses.dataclass
class Line:
    lineno: int
    custom_id: Any = None
    body: dict | None = None
    key: tuple | None = None            # conversation group key
    error: dict | None = None           # a line-level error, written without running
    prev: dict | None = None            # the record of an earlier run: skipped, used to rebuild history


def error_record(custom_id, lineno: int, err: APIError) -> dict:
    """The output line of a failed request: the server's error body for `err`, with the input line number and the
    HTTP status; `code` is the error's code, else its type."""
    body = openai_error(err.status, err.message, type=err.type, param=err.param, code=err.code)["error"]
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": None,
            "error": {"code": body["code"] or body["type"], "message": body["message"], "line": lineno,
                      "status_code": err.status, "type": body["type"], "param": body["param"]}}


def _line_error(custom_id, lineno: int, code: str, message: str, *, status: int = 400,
                param: str | None = None) -> dict:
    return error_record(custom_id, lineno, APIError(status, message, param=param, code=code))


def _group_key(body) -> tuple | None:
    if isinstance(body, dict):
        cid = body.get("conversation_id")
        if isinstance(cid, str) and cid:
            salt = body.get("cache_salt")
            return ("conversation", json.dumps(salt), cid)
    return None


def parse_lines(text_lines, done_ids: dict, done_lines: set) -> list[Line]:
    """Parse input lines into Line items (line-level errors attached, already done ones marked)."""
    out: list[Line] = []
    seen: set = set()
    for lineno, text in enumerate(text_lines, 1):
        if not text.strip():
            continue
        item = Line(lineno)
        out.append(item)
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, ValueError) as e:
            item.error = _line_error(None, lineno, "invalid_json", f"line {lineno} is not valid JSON: {e}")
        else:
            if not isinstance(obj, dict):
                item.error = _line_error(None, lineno, "invalid_line",
                                         f"line {lineno} must be a JSON object with custom_id, method, url, body")
            else:
                _check_line(item, obj, seen)
        if item.custom_id is not None and item.custom_id in done_ids:
            item.prev = done_ids[item.custom_id]
        elif item.custom_id is None and lineno in done_lines:
            item.prev = {}
    return out


def _check_line(item: Line, obj: dict, seen: set) -> None:
    n = item.lineno
    cid = obj.get("custom_id")
    body = obj.get("body")
    item.key = _group_key(body)
    if isinstance(cid, str) and cid:
        item.custom_id = cid
    else:
        item.error = _line_error(None, n, "invalid_custom_id",
                                 f"line {n}: custom_id must be a non-empty string", param="custom_id")
        return
    if cid in seen:
        item.error = _line_error(cid, n, "duplicate_custom_id",
                                 f"line {n}: custom_id {cid!r} already appears on an earlier line",
                                 param="custom_id")
        return
    seen.add(cid)
    method = obj.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        item.error = _line_error(cid, n, "invalid_method", f"line {n}: method must be POST, got {method!r}",
                                 status=405, param="method")
    elif obj.get("url") != CHAT_URL:
        item.error = _line_error(cid, n, "invalid_url",
                                 f"line {n}: url must be {CHAT_URL!r}, got {obj.get('url')!r}", status=404,
                                 param="url")
    elif not isinstance(body, dict):
        item.error = _line_error(cid, n, "invalid_body", f"line {n}: body must be a JSON object", param="body")
    else:
        item.body = body


def _cut_truncated(path: str, data: bytes) -> bytes:
    """A last line without its newline (a crash mid-write) is cut off the file so appending stays well formed."""
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return data


def read_done(path: str) -> tuple[dict, set]:
    """custom_id -> record and line numbers of id-less error lines already in the output `path` (a truncated last
    line is cut off first)."""
    done: dict = {}
    lines: set = set()
    if not os.path.exists(path):
        return done, lines
    with open(path, "rb") as f:
        data = _cut_truncated(path, f.read())
    for raw in data.decode("utf-8", errors="replace").splitlines():
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("%s: ignoring an unreadable output line", path)
            continue
        if not isinstance(rec, dict):
            continue
        cid = rec.get("custom_id")
        if isinstance(cid, str) and cid:
            if cid not in done or (done[cid].get("error") is not None and rec.get("error") is None):
                done[cid] = rec  # a repeated custom_id's error line must not hide its answered line
        elif isinstance(rec.get("error"), dict) and isinstance(rec["error"].get("line"), int):
            lines.add(rec["error"]["line"])
    return done, lines
