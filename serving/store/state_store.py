"""`StateStore`: the durable ledger of conversations, leases and stored responses in one database."""
from __future__ import annotations

from serving.store.conversations import ConversationTables
from serving.store.db import Database
from serving.store.leases import LeaseTable
from serving.store.migrations import migrate
from serving.store.responses import ResponseTable


class StateStore(ConversationTables, LeaseTable, ResponseTable):
    """Conversations (`load`, `commit_turn`, `delete`, `tombstone`, `touch`, `list`, `list_all`, `history`,
    `purge_tombstones`), leases (`acquire_lease`, `release_lease`, `lease_owner`) and stored responses
    (`put_response`, `get_response`, `delete_response`, `prune_responses`, `count_responses`).

    Every method is synchronous, runs one transaction and is durable when it returns; all are safe to call from
    many threads at once, and several processes or replicas may open the same database. Keys are
    `(salt, cid)` with `salt` None or a non-empty string; another salt never sees a conversation."""

    def __init__(self, db: Database):
        self._db = db
        self.schema_version = migrate(db)

    @classmethod
    def open(cls, target: str) -> "StateStore":
        """Open (creating and migrating as needed) the state database `target`: a `postgresql://` URL, an SQLite
        file path, `sqlite:///PATH`, or a directory (then `DIRECTORY/state.db`, e.g. the `--cache-dir`). Raises
        `SchemaVersionError` for a database written by newer code, `StoreError` for an unusable target."""
        db = Database.open(target)
        try:
            return cls(db)
        except BaseException:
            db.close()
            raise

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._db.dialect.name

    @property
    def description(self) -> str:
        """The SQLite file, or the PostgreSQL URL without its password."""
        return self._db.description

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
