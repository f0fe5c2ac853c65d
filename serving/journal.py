"""The durable side of the conversation ledger: settled turns, deletes, tombstones and leases in the state
database (serving/store), so a crash loses no settled turn and another replica can continue any conversation.

`Journal` adapts a `StateStore` to the ledger's keys (`(cache_salt, conversation_id)`) and to this replica's lease
owner name. Token ids are the truth and device states only a cache of them: a conversation the ledger finds in
the journal and not on the device is continued from its journaled ids (its next turn recomputes what no stored
state covers).

Leases: a turn takes the conversation's lease in the database for `lease_ttl` seconds; a thread renews the leases
of turns still in flight every `lease_ttl / 3` seconds, so a replica that dies holds its conversations for at most
`lease_ttl` (less when another server of the same host sees its process gone: `reap_dead_leases`). Every method
runs one transaction and is durable when it returns (a millisecond or so on SQLite with its fsync); they are
called on the threads that need them (the request's, the engine loop's on settle).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from serving.store import ConversationRecord, StateStore, Tombstone

log = logging.getLogger("serving.journal")
LEASE_TTL_S = 30.0


def replica_name() -> str:
    """This process's lease owner name: host, pid and a random part (a restarted process is another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _dead_here(owner: str) -> bool:
    """Whether `owner` names a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def reap_dead_leases(store: StateStore) -> int:
    """Drop the leases of processes of this host that died (killed mid-turn): a restarted server takes their
    conversations at once instead of after the lease's expiry. Returns how many."""
    return sum(store.release_owner(owner) for owner in store.lease_owners() if _dead_here(owner))


class Journal:
    def __init__(self, store: StateStore, owner: str | None = None, lease_ttl: float = LEASE_TTL_S):
        self.store, self.owner, self.lease_ttl = store, owner or replica_name(), float(lease_ttl)
        self._leased: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self._renewer.start()
        reaped = reap_dead_leases(store)
        if reaped:
            log.info("released %d leases of server processes of this host that died mid-turn", reaped)

    # ---------------------------------------------------------------- leases
    def acquire(self, key) -> bool:
        """Take the conversation's lease; False if another replica has a turn of it in flight."""
        if not self.store.acquire_lease(key[0], key[1], self.owner, self.lease_ttl):
            return False
        with self._lock:
            self._leased.add(key)
        return True

    def release(self, key) -> None:
        with self._lock:
            self._leased.discard(key)
        self.store.release_lease(key[0], key[1], self.owner)

    def _renew_loop(self):
        """Every lease_ttl / 3: renew the leases of the turns in flight, and drop those of dead processes of this
        host (a replica killed mid-turn)."""
        while not self._stop.wait(self.lease_ttl / 3):
            with self._lock:
                keys = list(self._leased)
            try:
                for key in keys:
                    self.store.acquire_lease(key[0], key[1], self.owner, self.lease_ttl)
                reap_dead_leases(self.store)
            except Exception:  # noqa: BLE001 (retried next time; a commit checks the lease)
                log.exception("could not renew the leases of the conversations in flight")

    # ---------------------------------------------------------------- conversations
    def load(self, key) -> ConversationRecord | Tombstone | None:
        return self.store.load(key[0], key[1])

    def commit(self, key, expected_turns: int, messages, seen, ids, replace_tombstone: bool = False) -> bool:
        """Write a settled turn onto the history it continued (`expected_turns` turns); False if that history
        changed meanwhile (another replica advanced it, or it was deleted or forgotten): nothing is written."""
        if replace_tombstone and isinstance(self.load(key), Tombstone):
            self.store.delete(key[0], key[1])
        return self.store.commit_turn(key[0], key[1], expected_turns, messages, seen, ids, None, owner=self.owner)

    def delete(self, key) -> bool:
        return self.store.delete(key[0], key[1])

    def forget(self, key, reason: str) -> bool:
        """Tombstone the conversation ('expired' or 'evicted'): its history is dropped, its id stays taken."""
        return self.store.tombstone(key[0], key[1], reason)

    def idle(self, ttl: float | None, max_conversations: int | None, now: float) -> list[tuple[tuple, str]]:
        """(key, reason) of live conversations to forget, across every replica: unused for longer than ttl, then
        the least recently used beyond max_conversations; none with a turn in flight."""
        return [((salt, cid), reason) for salt, cid, reason in
                self.store.idle(now - ttl if ttl else None, max_conversations)]

    def keys(self, salt) -> list[tuple]:
        """The live conversations of one salt."""
        return [(s.salt, s.cid) for s in self.store.list(salt, include_tombstones=False)]

    def purge_tombstones(self, older_than: float) -> int:
        return self.store.purge_tombstones(older_than)

    def close(self) -> None:
        self._stop.set()
        self._renewer.join(timeout=5)
        with self._lock:
            keys, self._leased = list(self._leased), set()
        for key in keys:
            try:
                self.store.release_lease(key[0], key[1], self.owner)
            except Exception:  # noqa: BLE001
                pass
        self.store.close()


def tombstone_message(conversation_id: str, tomb: Tombstone) -> str:
    why = "after --conversation-ttl without a turn" if tomb.reason == "expired" else "to bound the conversations kept"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(tomb.when))
    return (f"conversation {conversation_id!r} was forgotten by the server ({why}, at {when}): its history is gone. "
            "Resend the whole conversation (every earlier message, with the assistant's answers) to continue it, "
            "or DELETE it to reuse its id")
