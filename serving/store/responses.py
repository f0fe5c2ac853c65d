"""Stored Responses-API responses in the state database, bounded by `prune_responses`, least recently used out
first (as `serving.responses_store.ResponsesStore` does in memory: storing a response and looking it up by GET or
`previous_response_id` count as uses).

`record` is the caller's JSON object, stored as it is (the response as answered and whatever the caller needs to
continue it). A response belongs to the `cache_salt` it was stored with; a lookup or delete that names another
salt is answered as for an unknown id and changes nothing.
"""
from __future__ import annotations

import time

from serving.store.db import Database
from serving.store.records import StoredResponseRecord, dump_json, load_json, salt_key, salt_of

ANY_SALT = object()  # `get_response` / `delete_response` without a salt check


class ResponseTable:
    """The responses half of `StateStore` (see `serving/store/state_store.py`)."""
    _db: Database

    def put_response(self, rid: str, salt: str | None, record: dict, created: float | None = None) -> None:
        """Store (or replace) response `rid`; it counts as used at `created` (default now)."""
        created = time.time() if created is None else created
        with self._db.transaction() as tx:
            tx.run("INSERT INTO responses (id, salt, record, created, last_used) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET salt = excluded.salt, record = excluded.record, "
                   "created = excluded.created, last_used = excluded.last_used",
                   (rid, salt_key(salt), dump_json(record), created, created))

    def get_response(self, rid: str, salt=ANY_SALT, touch: bool = True) -> StoredResponseRecord | None:
        """Response `rid` (None if unknown, deleted, pruned, or not of `salt` when a salt is given). With
        `touch`, the lookup counts as a use (now) for `prune_responses`."""
        with self._db.transaction(write=touch) as tx:
            row = tx.one("SELECT salt, record, created, last_used FROM responses WHERE id = ?", (rid,))
            if row is None or (salt is not ANY_SALT and row[0] != salt_key(salt)):
                return None
            last_used = row[3]
            if touch:
                last_used = max(last_used, time.time())
                tx.run("UPDATE responses SET last_used = ? WHERE id = ?", (last_used, rid))
        return StoredResponseRecord(rid, salt_of(row[0]), load_json(row[1]), row[2], last_used)

    def delete_response(self, rid: str, salt=ANY_SALT) -> bool:
        """Remove response `rid` (only if it is `salt`'s, when a salt is given); False if there was none."""
        with self._db.transaction() as tx:
            if salt is ANY_SALT:
                return tx.run("DELETE FROM responses WHERE id = ?", (rid,)) > 0
            return tx.run("DELETE FROM responses WHERE id = ? AND salt = ?", (rid, salt_key(salt))) > 0

    def prune_responses(self, max_count: int) -> list[str]:
        """Delete the least recently used responses beyond `max_count`; returns their ids, oldest first."""
        if max_count < 0:
            raise ValueError("max_count must be >= 0")
        with self._db.transaction() as tx:
            excess = tx.one("SELECT COUNT(*) FROM responses")[0] - max_count
            if excess <= 0:
                return []
            ids = [r[0] for r in tx.all("SELECT id FROM responses ORDER BY last_used, created, id LIMIT ?",
                                        (excess,))]
            for rid in ids:
                tx.run("DELETE FROM responses WHERE id = ?", (rid,))
        return ids

    def count_responses(self) -> int:
        with self._db.transaction(write=False) as tx:
            return tx.one("SELECT COUNT(*) FROM responses")[0]
