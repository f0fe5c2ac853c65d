"""Conversations in the state database: the committed head of each, its settled turns, tombstones.

The commit rule: a turn is written only onto the history it continued. `commit_turn` is given the number of
turns the caller saw when it began (`expected_turns`, 0 for a new conversation) and succeeds only if the stored
count is still that, in one transaction that also writes the turn's row; so of two writers (threads, processes or
replicas) continuing the same history exactly one wins, and a turn is never lost or duplicated. SQLite
serializes writers with its write lock; on PostgreSQL the head row is locked (`SELECT ... FOR UPDATE`) and a new
conversation is created with `INSERT ... ON CONFLICT DO NOTHING`, which lets exactly one of two creators insert.
A tombstone counts as an existing conversation, so nothing commits onto it until it is deleted.
"""
from __future__ import annotations

import time

from serving.store.db import Database, Tx
from serving.store.records import (TOMBSTONE_REASONS, ConversationRecord, ConversationSummary, Tombstone,
                                   TurnRecord, common_prefix, common_prefix_bytes, digest_hex, dump_json,
                                   load_json, pack_ids, salt_key, salt_of, unpack_ids)

_HEAD = "SELECT turns, messages, seen, ids, digest, last_used, tombstone, tombstoned_at FROM conversations " \
        "WHERE salt = ? AND cid = ?"


class ConversationTables:
    """The conversation half of `StateStore` (see `serving/store/state_store.py`)."""
    _db: Database

    def load(self, salt: str | None, cid: str) -> ConversationRecord | Tombstone | None:
        """The conversation's committed head, its tombstone, or None if the id is free."""
        with self._db.transaction(write=False) as tx:
            row = tx.one(_HEAD, (salt_key(salt), cid))
        if row is None:
            return None
        turns, messages, seen, ids, digest, last_used, tombstone, tombstoned_at = row
        if tombstone is not None:
            return Tombstone(tombstone, tombstoned_at, turns)
        return ConversationRecord(salt, cid, turns, load_json(messages), load_json(seen), unpack_ids(ids), digest,
                                  last_used)

    def commit_turn(self, salt: str | None, cid: str, expected_turns: int, messages: list[dict],
                    seen: list[dict] | None, ids, digest: bytes | str | None, owner: str | None = None,
                    when: float | None = None) -> bool:
        """Settle a turn: the conversation's head becomes (messages, seen, ids, digest) and its turn count
        expected_turns + 1, durably, if and only if its stored turn count is `expected_turns` (0: the id must be
        free; a tombstone is not). With `owner`, also refused while another owner holds an unexpired lease on
        it. Returns whether it committed; a refusal changes nothing."""
        key, now = salt_key(salt), time.time() if when is None else when
        messages, seen, blob = list(messages), None if seen is None else list(seen), pack_ids(ids)
        head = (dump_json(messages), None if seen is None else dump_json(seen), blob, digest_hex(digest))
        with self._db.transaction() as tx:
            if owner is not None and _leased_by_other(tx, key, cid, owner):
                tx.abort()
                return False
            row = tx.one("SELECT turns, messages, seen, ids, tombstone FROM conversations "
                         "WHERE salt = ? AND cid = ? {lock_row}", (key, cid))
            if row is None and expected_turns == 0:
                before = ([], None, b"")
                changed = tx.run("INSERT INTO conversations (salt, cid, turns, messages, seen, ids, digest, created, "
                                 "last_used) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?) ON CONFLICT (salt, cid) DO NOTHING",
                                 (key, cid, *head, now, now))
            elif row is not None and row[4] is None and row[0] == expected_turns:
                before = (load_json(row[1]), load_json(row[2]), bytes(row[3] or b""))
                changed = tx.run("UPDATE conversations SET turns = ?, messages = ?, seen = ?, ids = ?, digest = ?, "
                                 "last_used = ? WHERE salt = ? AND cid = ? AND turns = ? AND tombstone IS NULL",
                                 (expected_turns + 1, *head, now, key, cid, expected_turns))
            else:
                changed = 0
            if changed != 1:
                tx.abort()
                return False
            _insert_turn(tx, key, cid, expected_turns + 1, before, (messages, seen, blob), head[3], owner, now)
        return True

    def delete(self, salt: str | None, cid: str) -> bool:
        """Remove the conversation, its turns, or its tombstone: the id is free again. A lease is left alone
        (take it first to refuse deleting a conversation with a turn in flight). False if the id was free."""
        key = salt_key(salt)
        with self._db.transaction() as tx:
            gone = tx.run("DELETE FROM conversations WHERE salt = ? AND cid = ?", (key, cid))
            tx.run("DELETE FROM turns WHERE salt = ? AND cid = ?", (key, cid))
        return gone > 0

    def tombstone(self, salt: str | None, cid: str, reason: str, when: float | None = None) -> bool:
        """Forget the conversation (its messages, ids and turns) but keep its id taken, with `reason` ('expired'
        or 'evicted'). False if there is no live conversation under that id."""
        if reason not in TOMBSTONE_REASONS:
            raise ValueError(f"tombstone reason must be one of {TOMBSTONE_REASONS}, not {reason!r}")
        key, now = salt_key(salt), time.time() if when is None else when
        with self._db.transaction() as tx:
            n = tx.run("UPDATE conversations SET messages = NULL, seen = NULL, ids = NULL, digest = NULL, "
                       "tombstone = ?, tombstoned_at = ? WHERE salt = ? AND cid = ? AND tombstone IS NULL",
                       (reason, now, key, cid))
            if n:
                tx.run("DELETE FROM turns WHERE salt = ? AND cid = ?", (key, cid))
        return n > 0

    def touch(self, salt: str | None, cid: str, when: float | None = None) -> bool:
        """Mark the conversation used at `when` (default now). False if there is no live conversation."""
        with self._db.transaction() as tx:
            return tx.run("UPDATE conversations SET last_used = ? WHERE salt = ? AND cid = ? AND tombstone IS NULL",
                          (time.time() if when is None else when, salt_key(salt), cid)) > 0

    def list(self, salt: str | None, include_tombstones: bool = True) -> list[ConversationSummary]:
        """The conversations of one salt, least recently used first."""
        return self._summaries("WHERE salt = ?", (salt_key(salt),), include_tombstones)

    def list_all(self, include_tombstones: bool = True) -> list[ConversationSummary]:
        """Every salt's conversations, least recently used first (for TTL and capacity decisions)."""
        return self._summaries("WHERE 1 = 1", (), include_tombstones)

    def _summaries(self, where: str, params: tuple, include_tombstones: bool) -> list[ConversationSummary]:
        if not include_tombstones:
            where += " AND tombstone IS NULL"
        with self._db.transaction(write=False) as tx:
            rows = tx.all(f"SELECT salt, cid, turns, last_used, tombstone FROM conversations {where} "
                          "ORDER BY last_used, salt, cid", params)
        return [ConversationSummary(salt_of(s), c, t, u, ts) for s, c, t, u, ts in rows]

    def idle(self, older_than: float | None, max_live: int | None, limit: int = 1000) -> list[tuple]:
        """Up to `limit` live conversations to forget, as (salt, cid, reason): those unused since before
        `older_than` ('expired'), then the least recently used beyond `max_live` ('evicted'); neither with a
        lease in force (a turn in flight)."""
        free = "tombstone IS NULL AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.salt = conversations.salt " \
               "AND l.cid = conversations.cid AND l.expires > {now})"
        out = []
        with self._db.transaction(write=False) as tx:
            if older_than is not None:
                out += [(salt_of(s), c, "expired") for s, c in tx.all(
                    f"SELECT salt, cid FROM conversations WHERE {free} AND last_used < ? ORDER BY last_used "
                    "LIMIT ?", (older_than, limit))]
            if max_live is not None and len(out) < limit:
                live = tx.one("SELECT COUNT(*) FROM conversations WHERE tombstone IS NULL")[0] - len(out)
                if live > max_live:
                    out += [(salt_of(s), c, "evicted") for s, c in tx.all(
                        f"SELECT salt, cid FROM conversations WHERE {free} AND last_used >= ? ORDER BY last_used "
                        "LIMIT ?", (older_than if older_than is not None else float("-inf"),
                                    min(live - max_live, limit - len(out))))]
        return out

    def history(self, salt: str | None, cid: str) -> list[TurnRecord]:
        """Every settled turn of a live conversation, whole, first to last ([] for a tombstone or a free id)."""
        with self._db.transaction(write=False) as tx:
            rows = tx.all("SELECT turn, keep_messages, messages, keep_seen, seen, keep_ids, ids, digest, owner, "
                          "committed FROM turns WHERE salt = ? AND cid = ? ORDER BY turn", (salt_key(salt), cid))
        out, messages, seen, ids = [], [], None, b""
        for turn, keep_m, m, keep_s, s, keep_i, i, digest, owner, committed in rows:
            messages = messages[:keep_m] + load_json(m)
            seen = None if keep_s is None else (seen or [])[:keep_s] + load_json(s)
            ids = ids[:keep_i * 4] + bytes(i)
            out.append(TurnRecord(turn, messages, seen, unpack_ids(ids), digest, owner, committed))
        return out

    def purge_tombstones(self, older_than: float) -> int:
        """Delete tombstones made before `older_than` (seconds since the epoch): their ids become free."""
        with self._db.transaction() as tx:
            return tx.run("DELETE FROM conversations WHERE tombstone IS NOT NULL AND tombstoned_at < ?",
                          (older_than,))


def _leased_by_other(tx: Tx, key: str, cid: str, owner: str) -> bool:
    return tx.one("SELECT owner FROM leases WHERE salt = ? AND cid = ? AND owner <> ? AND expires > {now}",
                  (key, cid, owner)) is not None


def _insert_turn(tx: Tx, key: str, cid: str, turn: int, before: tuple, after: tuple, digest: str | None,
                 owner: str | None, now: float) -> None:
    """The turn's row: what changed since the turn before (the kept prefix of each list, then the rest), so a
    long conversation stores each message and token id about once."""
    (m0, s0, i0), (m1, s1, i1) = before, after
    keep_m = common_prefix(m0, m1)
    keep_s = None if s1 is None else common_prefix(s0 or [], s1)
    keep_i = common_prefix_bytes(i0, i1)
    tx.run("INSERT INTO turns (salt, cid, turn, keep_messages, messages, keep_seen, seen, keep_ids, ids, digest, "
           "owner, committed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
           (key, cid, turn, keep_m, dump_json(m1[keep_m:]), keep_s, None if s1 is None else dump_json(s1[keep_s:]),
            keep_i, i1[keep_i * 4:], digest, owner, now))
