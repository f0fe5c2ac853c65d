"""Leases: one turn in flight per conversation, across replicas.

A lease is a row (salt, conversation id, owner, expires) with its expiry on the database's clock, so replicas
need not agree on the time. Taking one is a single upsert that replaces the row only if it is the caller's own
or has expired, so of two replicas racing for a free lease exactly one gets it. A replica that dies mid-turn
holds the conversation only until its lease expires. Leases are independent of the conversation rows: a new
conversation (no row yet) is leased the same way.
"""
from __future__ import annotations

from serving.store.db import Database
from serving.store.records import salt_key


class LeaseTable:
    """The lease half of `StateStore` (see `serving/store/state_store.py`)."""
    _db: Database

    def acquire_lease(self, salt: str | None, cid: str, owner: str, ttl_s: float) -> bool:
        """Take (or renew) the lease of the conversation for `ttl_s` seconds. True if it was free, expired or
        already `owner`'s; False if another owner holds it."""
        if not owner:
            raise ValueError("a lease owner is a non-empty string")
        with self._db.transaction() as tx:
            return tx.run("INSERT INTO leases (salt, cid, owner, expires) VALUES (?, ?, ?, {now} + ?) "
                          "ON CONFLICT (salt, cid) DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
                          "WHERE leases.owner = excluded.owner OR leases.expires <= {now}",
                          (salt_key(salt), cid, owner, float(ttl_s))) == 1

    def release_lease(self, salt: str | None, cid: str, owner: str) -> bool:
        """Give the lease back; True if `owner` held it (expired or not), False otherwise (nothing changes)."""
        with self._db.transaction() as tx:
            return tx.run("DELETE FROM leases WHERE salt = ? AND cid = ? AND owner = ?",
                          (salt_key(salt), cid, owner)) > 0

    def lease_owners(self) -> list[str]:
        """The owners of every lease, expired or not (each once)."""
        with self._db.transaction(write=False) as tx:
            return [row[0] for row in tx.all("SELECT DISTINCT owner FROM leases")]

    def release_owner(self, owner: str) -> int:
        """Drop every lease of `owner` (a process known to be dead); how many."""
        with self._db.transaction() as tx:
            return tx.run("DELETE FROM leases WHERE owner = ?", (owner,))

    def lease_owner(self, salt: str | None, cid: str) -> str | None:
        """Who holds an unexpired lease on the conversation, or None."""
        with self._db.transaction(write=False) as tx:
            row = tx.one("SELECT owner FROM leases WHERE salt = ? AND cid = ? AND expires > {now}",
                         (salt_key(salt), cid))
        return None if row is None else row[0]
