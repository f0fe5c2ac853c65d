"""The durable state database: every settled conversation turn and every stored Responses-API response,
written before the turn counts as settled, in SQLite (the embedded default, a file under `--cache-dir`) or in
PostgreSQL (`--state-db postgresql://...`, shared by several replicas).

    store = StateStore.open(cache_dir)            # or "postgresql://user@host/db"
    if store.acquire_lease(salt, cid, replica, ttl_s=60):
        try:
            head = store.load(salt, cid)          # ConversationRecord | Tombstone (404) | None (new)
            ...run the turn...
            ok = store.commit_turn(salt, cid, head.turns if head else 0, messages, seen, ids, digest,
                                   owner=replica)  # False: another writer advanced the history first
        finally:
            store.release_lease(salt, cid, replica)

Modules: `dialect` (the SQL differences between the backends, in one table), `db` (connections, transactions,
durability settings), `migrations` (the versioned schema), `records` (returned types and stored encodings),
`conversations`, `leases`, `responses` (the operations), `state_store` (`StateStore`, all of them on one
database). The schema and the commit rule are described in docs/design.md ("Durable state: the schema").
"""
from serving.store.db import StoreError
from serving.store.migrations import LATEST as SCHEMA_VERSION
from serving.store.migrations import SchemaVersionError
from serving.store.records import (ConversationRecord, ConversationSummary, StoredResponseRecord, Tombstone,
                                   TurnRecord)
from serving.store.responses import ANY_SALT
from serving.store.state_store import StateStore

__all__ = ["ANY_SALT", "SCHEMA_VERSION", "ConversationRecord", "ConversationSummary", "SchemaVersionError",
           "StateStore", "StoreError", "StoredResponseRecord", "Tombstone", "TurnRecord"]
