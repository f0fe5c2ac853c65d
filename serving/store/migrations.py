"""Versioned schema migrations.

`schema_version` holds one row per migration applied (its number and when). `migrate(db)` applies, in one
transaction each and in order, every migration newer than the database's version, so a database is always at
exactly one version; an older database is upgraded when newer code opens it. Code that finds a database *newer*
than it knows refuses it (`SchemaVersionError`): it cannot know what the newer tables mean. Migrations are only
ever appended; a released migration is never edited.

Replicas that start together are serialized: SQLite's write lock or PostgreSQL's advisory lock is taken before
the version is read, so each migration runs once.
"""
from __future__ import annotations

import time

from serving.store.db import Database, StoreError, Tx


class SchemaVersionError(StoreError):
    """The database was written by newer code (or is not a state database)."""


# Migration n: statements in the common SQL of `serving/store/dialect.py` ({blob}, {real} per backend).
MIGRATIONS: dict[int, list[str]] = {
    1: [
        # A conversation's head: its latest turn whole (messages as rendered and as seen as JSON lists, token
        # ids as int32 little-endian bytes, the head checkpoint's digest in hex), or a tombstone (every column
        # of the head NULL, `tombstone` the reason).
        """CREATE TABLE conversations (
            salt TEXT NOT NULL,
            cid TEXT NOT NULL,
            turns INTEGER NOT NULL,
            messages TEXT,
            seen TEXT,
            ids {blob},
            digest TEXT,
            created {real} NOT NULL,
            last_used {real} NOT NULL,
            tombstone TEXT,
            tombstoned_at {real},
            PRIMARY KEY (salt, cid))""",
        "CREATE INDEX conversations_last_used ON conversations (last_used)",
        # Every settled turn, as the change from the turn before: the first keep_* entries of the previous
        # turn's lists, then these (keep_seen NULL: the turn had no seen messages).
        """CREATE TABLE turns (
            salt TEXT NOT NULL,
            cid TEXT NOT NULL,
            turn INTEGER NOT NULL,
            keep_messages INTEGER NOT NULL,
            messages TEXT NOT NULL,
            keep_seen INTEGER,
            seen TEXT,
            keep_ids INTEGER NOT NULL,
            ids {blob} NOT NULL,
            digest TEXT,
            owner TEXT,
            committed {real} NOT NULL,
            PRIMARY KEY (salt, cid, turn))""",
        # One turn in flight per conversation, across replicas: the holder and when its lease ends (the
        # database's clock).
        """CREATE TABLE leases (
            salt TEXT NOT NULL,
            cid TEXT NOT NULL,
            owner TEXT NOT NULL,
            expires {real} NOT NULL,
            PRIMARY KEY (salt, cid))""",
        # Stored Responses-API responses; `record` is the caller's JSON object.
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            salt TEXT NOT NULL,
            record TEXT NOT NULL,
            created {real} NOT NULL,
            last_used {real} NOT NULL)""",
        "CREATE INDEX responses_lru ON responses (last_used, created)",
    ],
}
LATEST = max(MIGRATIONS)

_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied {real} NOT NULL)"


def current_version(tx: Tx) -> int:
    row = tx.one("SELECT MAX(version) FROM schema_version")
    return 0 if row is None or row[0] is None else int(row[0])


def migrate(db: Database, migrations: dict[int, list[str]] | None = None) -> int:
    """Bring `db` to the newest version in `migrations` (default: MIGRATIONS); returns that version. Raises
    SchemaVersionError if the database is newer than the code."""
    migrations = MIGRATIONS if migrations is None else migrations
    latest = max(migrations)
    while True:
        with db.transaction(write=True) as tx:
            if db.dialect.migration_lock:
                tx.one(db.dialect.migration_lock)
            tx.run(_VERSION_TABLE)
            version = current_version(tx)
            if version > latest:
                raise SchemaVersionError(
                    f"the state database {db.description} has schema version {version}, newer than this code "
                    f"knows ({latest}); it was written by a newer hybrid-serve: upgrade this one, or give it "
                    "another --state-db")
            if version == latest:
                return version
            for sql in migrations[version + 1]:
                tx.run(sql)
            tx.run("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version + 1, time.time()))
