"""The SQL differences between the two backends, in one table.

Every statement in `serving.store` is written once, in the common subset of SQLite (3.24 or newer) and PostgreSQL:
`?` placeholders, `INSERT ... ON CONFLICT (key) DO NOTHING / DO UPDATE SET col = excluded.col [WHERE ...]`
(the same syntax in both), TEXT for strings and JSON. What differs is named by a `Dialect` field and substituted
here:

| field            | SQLite                                        | PostgreSQL                                        |
|------------------|-----------------------------------------------|---------------------------------------------------|
| placeholder      | `?`                                           | `%s` (psycopg)                                    |
| blob             | `BLOB`                                        | `BYTEA`                                           |
| real             | `REAL` (an 8-byte float)                      | `DOUBLE PRECISION`                                |
| now              | `(julianday('now') - 2440587.5) * 86400.0`    | `EXTRACT(EPOCH FROM clock_timestamp())::float8`   |
| begin_write      | `BEGIN IMMEDIATE` (takes the write lock now)  | none (a transaction begins with its first query)  |
| lock_row         | none (the write lock covers the database)     | `FOR UPDATE`                                      |
| migration_lock   | none (`BEGIN IMMEDIATE` serializes)           | `SELECT pg_advisory_xact_lock(...)`               |

`now` is the database's clock in seconds since the epoch: leases compare against it, so replicas whose clocks
differ still agree on when a lease expires.
"""
from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class Dialect:
    name: str
    placeholder: str
    blob: str
    real: str
    now: str
    begin_write: str | None
    lock_row: str
    migration_lock: str | None

    def sql(self, text: str) -> str:
        """`text` written with `?` placeholders and `{blob}`, `{real}`, `{now}`, `{lock_row}` names, in this
        dialect. Statements hold no literal `?`, `%`, `{` or `}` of their own."""
        return _render(self, text)


@functools.lru_cache(maxsize=512)
def _render(dialect: Dialect, text: str) -> str:
    out = text.format(blob=dialect.blob, real=dialect.real, now=dialect.now, lock_row=dialect.lock_row)
    return out.replace("?", dialect.placeholder) if dialect.placeholder != "?" else out


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    blob="BLOB",
    real="REAL",
    now="((julianday('now') - 2440587.5) * 86400.0)",
    begin_write="BEGIN IMMEDIATE",
    lock_row="",
    migration_lock=None,
)

POSTGRESQL = Dialect(
    name="postgresql",
    placeholder="%s",
    blob="BYTEA",
    real="DOUBLE PRECISION",
    now="(EXTRACT(EPOCH FROM clock_timestamp())::float8)",
    begin_write=None,
    lock_row="FOR UPDATE",
    # any constant key: one migration at a time per database ("hybrid-serve" as a 32-bit number)
    migration_lock="SELECT pg_advisory_xact_lock(1752387168)",
)
