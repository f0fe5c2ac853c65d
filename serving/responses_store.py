"""The stored responses of the Responses API (`/v1/responses`), bounded, least recently used first out, and
durable across a graceful restart with `--cache-dir`.

A stored response is the response object the client got (returned again by GET) plus the conversation it
continues: the chat messages of its whole `previous_response_id` chain, its own input items as chat messages and
its output as an assistant message. Instructions are not part of it (as in OpenAI's API, a request's
`instructions` do not carry over to the responses that continue it).

The histories are a persistent linked list of segments (`Segment`: a parent and this response's own messages),
so a chain of n responses holds each message once, not n times, and deleting or evicting a response never
breaks the responses that continued from it: their segments keep their ancestors' messages alive. Deleting a
response therefore removes it (GET, DELETE and `previous_response_id` answer 404), not its content from its
descendants.

Every response belongs to the `cache_salt` it was created with (None is a tenant of its own): a lookup with
another salt is answered as for an unknown id.

On disk: `<cache dir>/responses.json`, written atomically (a temporary file, fsync, rename) with mode 0600, as
`{"format": 1, "segments": {...}, "responses": [...]}` in least- to most-recently-used order.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("serving.responses_store")

FORMAT = 1
FILENAME = "responses.json"
DEFAULT_MAX_STORED_RESPONSES = 10000


@dataclass(frozen=True, eq=False)
class Segment:
    """This response's own chat messages (its input, then its output), after its parent's."""
    parent: "Segment | None"
    messages: tuple

    def history(self) -> list[dict]:
        parts, seg = [], self
        while seg is not None:
            parts.append(seg.messages)
            seg = seg.parent
        return [dict(m) for part in reversed(parts) for m in part]


@dataclass(eq=False)
class StoredResponse:
    id: str
    salt: str | None
    response: dict          # the response object as answered (GET returns it)
    segment: Segment        # the conversation up to and including this response's output

    def history(self) -> list[dict]:
        return self.segment.history()


class ResponsesStore:
    """Stored responses by id, at most `max_responses` of them (least recently used evicted first; a lookup by
    GET or `previous_response_id` counts as a use). Thread-safe."""

    def __init__(self, max_responses: int = DEFAULT_MAX_STORED_RESPONSES):
        if int(max_responses) < 0:
            raise ValueError("max_responses must be >= 0")
        self.max_responses = int(max_responses)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[StoredResponse]:
        """The stored responses, least recently used first."""
        with self._lock:
            return list(self._items.values())

    def add(self, rid: str, salt: str | None, response: dict, parent: StoredResponse | Segment | None,
            messages: list[dict]) -> StoredResponse | None:
        """Store a response whose own messages (input items and output) are `messages`, continuing `parent`.
        Returns None when the store holds nothing (max_responses 0)."""
        if isinstance(parent, StoredResponse):
            parent = parent.segment
        item = StoredResponse(rid, salt, response, Segment(parent, tuple(dict(m) for m in messages)))
        if self.max_responses == 0:
            return None
        with self._lock:
            self._items[rid] = item
            self._items.move_to_end(rid)
            while len(self._items) > self.max_responses:
                old, _ = self._items.popitem(last=False)
                self.evictions += 1
                log.debug("evicted stored response %s (store full: %d)", old, self.max_responses)
        return item

    def get(self, rid: str, salt: str | None) -> StoredResponse | None:
        """The response `rid` of tenant `salt` (and mark it used); None if unknown, deleted, evicted or another
        tenant's."""
        with self._lock:
            item = self._items.get(rid)
            if item is None or item.salt != salt:
                return None
            self._items.move_to_end(rid)
            return item

    def delete(self, rid: str, salt: str | None) -> bool:
        with self._lock:
            item = self._items.get(rid)
            if item is None or item.salt != salt:
                return False
            del self._items[rid]
            return True

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        with self._lock:
            items = list(self._items.values())
        seg_ids: dict[int, str] = {}
        segments: dict[str, dict] = {}

        def seg_id(seg: Segment) -> str:
            # Iterative: chains can be longer than Python's recursion limit.
            todo = []
            while seg is not None and id(seg) not in seg_ids:
                todo.append(seg)
                seg = seg.parent
            for s in reversed(todo):
                sid = str(len(seg_ids))
                seg_ids[id(s)] = sid
                segments[sid] = {"parent": None if s.parent is None else seg_ids[id(s.parent)],
                                 "messages": list(s.messages)}
            return seg_ids[id(todo[0])] if todo else seg_ids[id(seg)]

        responses = [{"id": it.id, "salt": it.salt, "response": it.response, "segment": seg_id(it.segment)}
                     for it in items]
        return {"format": FORMAT, "segments": segments, "responses": responses}

    def load_json(self, data: dict) -> int:
        """Replace the contents with a `to_json` document; returns how many responses were loaded."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a responses store of format {FORMAT}")
        raw = data["segments"]
        built: dict[str, Segment] = {}

        def build(sid: str) -> Segment:
            todo = []
            while sid is not None and sid not in built:
                todo.append(sid)
                sid = raw[sid]["parent"]
            for s in reversed(todo):
                p = raw[s]["parent"]
                msgs = raw[s]["messages"]
                if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         and isinstance(m.get("content"), str) for m in msgs):
                    raise ValueError(f"segment {s}: malformed messages")
                built[s] = Segment(None if p is None else built[p], tuple(msgs))
            return built[todo[0]] if todo else built[sid]

        items: OrderedDict[str, StoredResponse] = OrderedDict()
        for r in data["responses"]:
            rid, salt = r["id"], r["salt"]
            if not isinstance(rid, str) or not (salt is None or isinstance(salt, str)):
                raise ValueError("malformed response entry")
            items[rid] = StoredResponse(rid, salt, dict(r["response"]), build(r["segment"]))
        while len(items) > self.max_responses:
            items.popitem(last=False)
        with self._lock:
            self._items = items
        return len(items)

    def save(self, directory: str) -> str:
        """Write the store to `directory`/responses.json atomically, readable by the owner only."""
        path = os.path.join(os.path.abspath(directory), FILENAME)
        atomic_write_private(path, json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")))
        return path

    def load(self, directory: str) -> int:
        """Load `directory`/responses.json if it exists (0 if not). A malformed file raises ValueError."""
        path = os.path.join(os.path.abspath(directory), FILENAME)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return 0
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return self.load_json(data)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: malformed ({type(e).__name__}: {e})") from None


def atomic_write_private(path: str, text: str) -> None:
    """Write `text` to `path` atomically: a mode-0600 temporary file beside it, fsynced, then renamed over it
    (readers see the old file or the new one, never a part), and the directory fsynced."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and if the temporary file existed with another mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)

