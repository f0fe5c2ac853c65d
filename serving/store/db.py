"""The connection layer: a small pool of connections to one database (SQLite file or PostgreSQL URL) and
transactions over them.

`Database.transaction(write)` lends the calling thread a connection of its own for one transaction, so the
store is safe to use from many threads at once; several processes or replicas are kept apart by the database
itself (SQLite: one writer at a time, others wait up to `BUSY_TIMEOUT_S`; PostgreSQL: row locks and
conditional statements, see `serving/store/conversations.py`).

SQLite durability: WAL mode with `synchronous=FULL`. Every commit of a write transaction is fsynced to the WAL
before `transaction()` returns, so a settled turn survives a SIGKILL of the process (as WAL with `NORMAL` would)
and also a power loss or kernel crash (which `NORMAL` may lose: the last commits before the next checkpoint). The
price is one fsync per write (about a millisecond or less on an SSD), paid once per settled turn, which itself
costs at least one model step; PostgreSQL's default (`synchronous_commit = on`) makes the same promise, so both
backends mean the same by "settled".
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from typing import Any, Callable, Iterator

from serving.store.dialect import POSTGRESQL, SQLITE, Dialect

BUSY_TIMEOUT_S = 30.0     # how long an SQLite writer waits for another writer (another thread, process, replica)
MAX_IDLE = 8              # connections kept open between transactions
DEFAULT_FILENAME = "state.db"  # the SQLite file when the target is a directory (e.g. --cache-dir)
SQLITE_SYNCHRONOUS = "FULL"    # see the module docstring


class StoreError(Exception):
    """The state database cannot be used as asked (bad target, missing driver, unusable schema)."""


def is_postgresql(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def sqlite_path(target: str) -> str:
    """The file an SQLite target names: a path, `sqlite:///PATH`, or a directory (then `DIRECTORY/state.db`)."""
    path = target[len("sqlite://"):] if target.startswith("sqlite://") else target
    if not path or path == ":memory:":
        raise StoreError("the state database must be a file (an in-memory SQLite database is not shared between "
                         "connections)")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        path = os.path.join(path, DEFAULT_FILENAME)
    return path


class Tx:
    """One transaction on one connection. `run` returns the number of rows a statement changed."""

    def __init__(self, cursor, dialect: Dialect):
        self._cur = cursor
        self.dialect = dialect
        self.aborted = False

    def run(self, sql: str, params: tuple = ()) -> int:
        self._cur.execute(self.dialect.sql(sql), params)
        return self._cur.rowcount

    def one(self, sql: str, params: tuple = ()) -> tuple | None:
        self._cur.execute(self.dialect.sql(sql), params)
        return self._cur.fetchone()

    def all(self, sql: str, params: tuple = ()) -> list[tuple]:
        self._cur.execute(self.dialect.sql(sql), params)
        return self._cur.fetchall()

    def abort(self) -> None:
        """Roll back instead of committing when the transaction block ends."""
        self.aborted = True


class Database:
    """A pool of connections to one database. Thread-safe; `close()` closes every idle connection (and each lent
    one when it comes back)."""

    def __init__(self, dialect: Dialect, connect: Callable[[], Any], description: str):
        self.dialect = dialect
        self.description = description
        self._connect = connect
        self._idle: list = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, target: str) -> "Database":
        """A database for `target`: a `postgresql://` (or `postgres://`) URL, else an SQLite file path."""
        if is_postgresql(target):
            return cls(POSTGRESQL, _postgresql_connector(target), _redact(target))
        path = sqlite_path(target)
        _create_private(path)
        return cls(SQLITE, lambda: _sqlite_connect(path), path)

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        """A transaction on a connection lent to this thread: committed when the block ends, rolled back if it
        raises or calls `Tx.abort()`. A write transaction on SQLite takes the database's write lock at once, so
        two writers never deadlock upgrading their locks."""
        conn = self._take()
        ok = False
        try:
            cur = conn.cursor()
            if self.dialect is SQLITE:
                cur.execute(self.dialect.begin_write if write else "BEGIN")
            tx = Tx(cur, self.dialect)
            yield tx
            if tx.aborted:
                conn.rollback() if self.dialect is POSTGRESQL else cur.execute("ROLLBACK")
            else:
                conn.commit() if self.dialect is POSTGRESQL else cur.execute("COMMIT")
            ok = True
        finally:
            if not ok:
                ok = _rollback(conn, self.dialect)
            self._give(conn, ok)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self):
        with self._lock:
            if self._closed:
                raise StoreError("the state store is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give(self, conn, reusable: bool) -> None:
        if reusable and not getattr(conn, "closed", False):
            with self._lock:
                if not self._closed and len(self._idle) < MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()


def _rollback(conn, dialect: Dialect) -> bool:
    """Roll back after an error; False if the connection is unusable (then it is closed, not pooled)."""
    try:
        if dialect is POSTGRESQL:
            conn.rollback()
        elif conn.in_transaction:
            conn.execute("ROLLBACK")
        return not getattr(conn, "broken", False)
    except Exception:
        return False


def _sqlite_connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module issues no BEGIN/COMMIT of its own; `transaction()` does.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise StoreError(f"{path}: SQLite could not switch to WAL mode (journal_mode is {mode})")
    conn.execute(f"PRAGMA synchronous = {SQLITE_SYNCHRONOUS}")
    return conn


def _create_private(path: str) -> None:
    """Create the SQLite file readable by its owner only (it holds every tenant's messages; SQLite gives the
    -wal and -shm files the same mode), and its directory if needed."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _postgresql_connector(url: str) -> Callable[[], Any]:
    try:
        import psycopg  # only PostgreSQL users need the driver
    except ImportError as e:
        raise StoreError(f"a postgresql:// state database needs the psycopg driver (pip install "
                         f"'psycopg[binary]'): {e}") from None

    def connect():
        return psycopg.connect(url, autocommit=False)
    return connect


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
