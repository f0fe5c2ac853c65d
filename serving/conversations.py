"""Step 2, the frontend conversation ledger: leases and the committed messages and token ids per conversation.

The key is (cache_salt, conversation_id), so another salt never finds the conversation (I5). A lease allows one
turn in flight per key (I6). `ids` are the tokens of the committed turns: what the model consumed, plus the last
sampled token when it was not a stop token (the next turn feeds it first).

With a `Journal` (serving/journal.py: the state database, `--cache-dir` or `--state-db`) the database is the
truth: a lease is taken there too and loads the committed head from it, a settled turn is written there before
it counts as settled, and only conversations with a turn in flight are kept in memory. Without one, the table
lives in memory.

A conversation forgotten by the time-to-live or the table's bound leaves a tombstone: a turn that continues it
without resending its history (its messages hold no assistant message, or a raw completion) is answered 404
`conversation_expired`; a turn that resends the whole history starts it over; DELETE frees the id.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict

from serving.errors import ConversationBusy, ConversationExpired
from serving.journal import Journal, tombstone_message
from serving.store import ConversationRecord, Tombstone

log = logging.getLogger("serving.conversations")
MAX_TOMBSTONES = 100_000  # tombstones kept in memory (without a journal), oldest dropped first


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
    over_tombstone: bool = False    # its turn in flight starts a forgotten conversation over (whole history)


def _from_record(rec: ConversationRecord) -> Conversation:
    return Conversation(list(rec.messages), list(rec.ids), rec.turns, rec.last_used, seen=rec.seen)


class ConversationLedger:
    def __init__(self, settle_wait: float = 10.0, journal: Journal | None = None):
        self._lock = threading.Condition()
        self._convs: dict[tuple[str | None, str], Conversation] = {}
        self._tombstones: OrderedDict[tuple, Tombstone] = OrderedDict()  # without a journal
        self.settle_wait = settle_wait
        self.journal = journal

    def _settled(self, key) -> None:
        """Wait (holding the lock) until key's last turn is no longer awaiting the confirmation of its delivery."""
        self._lock.wait_for(lambda: not (key in self._convs and self._convs[key].held), self.settle_wait)

    def lease(self, key, whole_history: bool = False) -> Conversation | None:
        """Take the lease of key; returns a snapshot of the committed conversation (None if new). A turn that
        finished but awaits confirmation of its delivery is waited for (a client sends its next turn as soon as
        it has read the answer, which can be before the server has settled it). ConversationBusy if a turn is
        in flight (here or, with a journal, on another replica); ConversationExpired if the conversation was
        forgotten and the turn does not resend its `whole_history`."""
        with self._lock:
            self._settled(key)
            conv = self._convs.get(key)
            if conv is not None and conv.busy:
                raise ConversationBusy(f"conversation {key[1]!r} already has a turn in flight; "
                                       "retry when it finishes")
            if conv is None:
                conv = self._convs[key] = Conversation(messages=[], ids=[])
            conv.busy, conv.over_tombstone = True, False
            tomb = self._tombstones.get(key) if conv.turns == 0 else None
        try:
            if self.journal is not None:
                if not self.journal.acquire(key):
                    raise ConversationBusy(f"conversation {key[1]!r} has a turn in flight on another replica; "
                                           "retry when it finishes")
                found = self.journal.load(key)
                tomb = found if isinstance(found, Tombstone) else None
                with self._lock:
                    fresh = _from_record(found) if isinstance(found, ConversationRecord) else Conversation([], [])
                    conv.messages, conv.ids, conv.seen, conv.turns = fresh.messages, fresh.ids, fresh.seen, fresh.turns
            if tomb is not None and not whole_history:
                raise ConversationExpired(tombstone_message(key[1], tomb), param="conversation_id")
        except BaseException:
            self._unlease(key)
            raise
        with self._lock:
            conv.over_tombstone = tomb is not None
            if conv.turns == 0:
                return None
            return Conversation(list(conv.messages), list(conv.ids), conv.turns, conv.last_used,
                                seen=list(conv.seen or conv.messages))

    def _unlease(self, key) -> None:
        if self.journal is not None:
            try:
                self.journal.release(key)
            except Exception:  # noqa: BLE001 (it expires)
                log.exception("could not release the lease of a conversation")
        with self._lock:
            conv = self._convs.get(key)
            if conv is not None:
                conv.busy = conv.held = False
                if conv.turns == 0 or self.journal is not None:
                    del self._convs[key]
            self._lock.notify_all()

    def finish(self, key, ok: bool, messages: list[dict] | None = None, ids: list[int] | None = None,
               seen: list[dict] | None = None) -> bool:
        """Release the lease; on success the turn's messages and ids become the committed ones (with a journal,
        written to the database first: refused if another replica advanced or deleted the history meanwhile).
        Returns whether the turn was committed."""
        with self._lock:
            conv = self._convs.get(key)
            if conv is None:
                return False
            expected, over = conv.turns, conv.over_tombstone
        if ok and self.journal is not None:
            try:
                ok = self.journal.commit(key, expected, messages, seen, ids, replace_tombstone=over)
            except Exception:  # noqa: BLE001 (the turn is not committed; the server keeps serving)
                log.exception("could not write a settled turn to the state database; it is not committed")
                ok = False
            if not ok:
                log.warning("a turn of a conversation was not committed: its history changed in the state database "
                            "while the turn ran (another replica, a delete or an expiry)")
        if ok:
            with self._lock:
                conv.messages, conv.ids, conv.seen = messages, ids, seen
                conv.turns += 1
                conv.last_used = time.time()
                if over:
                    self._tombstones.pop(key, None)
        self._unlease(key)
        return ok

    def hold(self, key) -> None:
        """The turn in flight finished; its commit waits for the confirmation of its delivery."""
        with self._lock:
            if key in self._convs:
                self._convs[key].held = True

    def get(self, key) -> Conversation | None:
        """The committed conversation (None if it has no committed turn; ConversationExpired if it was
        forgotten). A turn that finished and awaits the confirmation of its delivery is waited for first, as
        `lease` does: a client that read the whole answer finds it committed."""
        with self._lock:
            self._settled(key)
            conv, tomb = self._convs.get(key), self._tombstones.get(key)
            if self.journal is None:
                if tomb is not None and (conv is None or conv.turns == 0):
                    raise ConversationExpired(tombstone_message(key[1], tomb), param="conversation_id")
                return None if conv is None or conv.turns == 0 else dataclasses.replace(conv)
        found = self.journal.load(key)
        if isinstance(found, Tombstone):
            raise ConversationExpired(tombstone_message(key[1], found), param="conversation_id")
        return None if found is None else _from_record(found)

    def delete(self, key) -> bool:
        """Forget the conversation (or its tombstone): its id is free. ConversationBusy with a turn in flight."""
        busy = ConversationBusy(f"conversation {key[1]!r} has a turn in flight")
        with self._lock:
            conv = self._convs.get(key)
            if conv is not None and (conv.busy or conv.held):
                raise busy
            if self.journal is None:
                tomb = self._tombstones.pop(key, None)
                if conv is None or conv.turns == 0:
                    return tomb is not None
                del self._convs[key]
                return True
        if not self.journal.acquire(key):
            raise busy
        try:
            return self.journal.delete(key)
        finally:
            self.journal.release(key)

    def idle_to_forget(self, ttl: float | None, max_conversations: int | None, now: float) -> list:
        """(key, reason) of idle conversations to forget: unused for longer than ttl ('expired'), then the least
        recently used ones beyond max_conversations ('evicted'). A conversation with a turn in flight is never
        forgotten."""
        if self.journal is not None:
            return self.journal.idle(ttl, max_conversations, now)
        with self._lock:
            idle = sorted((c.last_used, k) for k, c in self._convs.items()
                          if not (c.busy or c.held) and c.turns > 0)
            old = [k for t, k in idle if ttl and now - t > ttl]
            live = sum(c.turns > 0 for c in self._convs.values())
            excess = live - len(old) - (max_conversations or live)
            rest = [k for _, k in idle if k not in set(old)]
            return [(k, "expired") for k in old] + [(k, "evicted") for k in rest[:max(excess, 0)]]

    def forget(self, key, reason: str) -> bool:
        """Drop the conversation's history and keep its tombstone; False if it is gone or has a turn in flight."""
        if self.journal is not None:
            return self.journal.forget(key, reason)
        with self._lock:
            conv = self._convs.get(key)
            if conv is None or conv.busy or conv.held or conv.turns == 0:
                return False
            del self._convs[key]
            self._tombstones[key] = Tombstone(reason, time.time(), conv.turns)
            while len(self._tombstones) > MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
            return True

    def purge_tombstones(self, older_than: float) -> int:
        """Free the ids of conversations forgotten before `older_than` (seconds since the epoch)."""
        if self.journal is not None:
            return self.journal.purge_tombstones(older_than)
        with self._lock:
            old = [k for k, t in self._tombstones.items() if t.when < older_than]
            for k in old:
                del self._tombstones[k]
            return len(old)

    def keys(self, salt) -> list:
        """The keys of one salt's committed conversations."""
        if self.journal is not None:
            return self.journal.keys(salt)
        with self._lock:
            return [k for k, c in self._convs.items() if k[0] == salt and c.turns > 0]

    def items(self):
        """The committed conversations kept in memory (all of them without a journal; none with one)."""
        with self._lock:
            return [(k, dataclasses.replace(c)) for k, c in self._convs.items() if c.turns > 0]

    def restore(self, key, conv: Conversation) -> None:
        with self._lock:
            self._convs[key] = conv
