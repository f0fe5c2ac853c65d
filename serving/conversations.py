"""Step 2, the frontend conversation ledger: leases and the committed messages and token ids per conversation.

The key is (cache_salt, conversation_id), so another salt never finds the conversation (I5). A lease allows one
turn in flight per key (I6). `ids` are the tokens of the committed turns: what the model consumed, plus the last
sampled token when it was not a stop token (the next turn feeds it first).
"""
from __future__ import annotations

import dataclasses
import threading
import time

from serving.errors import ConversationBusy


@dataclasses.dataclass
class Conversation:
    messages: list[dict]      # as rendered into `ids` (answers exactly as their token ids decode)
    ids: list[int]
    turns: int = 0
    last_used: float = dataclasses.field(default_factory=time.time)
    busy: bool = False
    held: bool = False        # its last turn finished and awaits confirmation of delivery (two-phase commit)
    seen: list[dict] | None = None  # the same messages as the client received them (stop strings cut,
                                    # special tokens hidden): a resent history matches either form


class ConversationLedger:
    def __init__(self, settle_wait: float = 10.0):
        self._lock = threading.Condition()
        self._convs: dict[tuple[str | None, str], Conversation] = {}
        self.settle_wait = settle_wait

    def lease(self, key) -> Conversation | None:
        """Take the lease of key; returns a snapshot of the committed conversation (None if new). A turn that
        finished but awaits confirmation of its delivery is waited for (a client sends its next turn as soon as
        it has read the answer, which can be before the server has settled it)."""
        with self._lock:
            self._lock.wait_for(lambda: not (key in self._convs and self._convs[key].held), self.settle_wait)
            conv = self._convs.get(key)
            if conv is None:
                self._convs[key] = Conversation(messages=[], ids=[], busy=True)
                return None
            if conv.busy:
                raise ConversationBusy(f"conversation {key[1]!r} already has a turn in flight; "
                                       "retry when it finishes")
            conv.busy = True
            if conv.turns == 0:
                return None
            return Conversation(list(conv.messages), list(conv.ids), conv.turns, conv.last_used,
                                seen=list(conv.seen or conv.messages))

    def finish(self, key, ok: bool, messages: list[dict] | None = None, ids: list[int] | None = None,
               seen: list[dict] | None = None) -> None:
        """Release the lease; on success the turn's messages and ids become the committed ones."""
        with self._lock:
            conv = self._convs.get(key)
            if conv is None:
                return
            conv.busy = conv.held = False
            self._lock.notify_all()
            if ok:
                conv.messages, conv.ids, conv.seen = messages, ids, seen
                conv.turns += 1
                conv.last_used = time.time()
            elif conv.turns == 0:
                del self._convs[key]

    def hold(self, key) -> None:
        """The turn in flight finished; its commit waits for the confirmation of its delivery."""
        with self._lock:
            if key in self._convs:
                self._convs[key].held = True

    def get(self, key) -> Conversation | None:
        with self._lock:
            conv = self._convs.get(key)
            return None if conv is None or conv.turns == 0 else dataclasses.replace(conv)

    def delete(self, key) -> bool:
        with self._lock:
            conv = self._convs.get(key)
            if conv is None or conv.turns == 0:
                return False
            if conv.busy:
                raise ConversationBusy(f"conversation {key[1]!r} has a turn in flight")
            del self._convs[key]
            return True

    def idle_to_forget(self, ttl: float | None, max_conversations: int | None, now: float) -> list:
        """Keys of idle conversations to forget: unused for longer than ttl, then the least recently used ones
        beyond max_conversations. A conversation with a turn in flight is never forgotten."""
        with self._lock:
            idle = sorted((c.last_used, k) for k, c in self._convs.items() if not (c.busy or c.held))
            old = [k for t, k in idle if ttl and now - t > ttl]
            excess = len(self._convs) - len(old) - (max_conversations or len(self._convs))
            rest = [k for _, k in idle if k not in set(old)]
            return old + rest[:max(excess, 0)]

    def items(self):
        with self._lock:
            return [(k, dataclasses.replace(c)) for k, c in self._convs.items() if c.turns > 0]

    def restore(self, key, conv: Conversation) -> None:
        with self._lock:
            self._convs[key] = conv
