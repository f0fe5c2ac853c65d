"""serving/store: the durable state database, on SQLite (a file in tmp_path) and on a real PostgreSQL server
(tests/pg_server.py; fails, not skips, where PostgreSQL is not installed). Two StateStore instances on one
database stand for two replicas."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from serving.store import (SCHEMA_VERSION, ConversationRecord, SchemaVersionError, StateStore, StoreError,
                           Tombstone)
from serving.store.db import Database
from serving.store.migrations import MIGRATIONS, migrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """A fresh, empty state database: an SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def store(target):
    s = StateStore.open(target)
    yield s
    s.close()


def msgs(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def race(n, fn):
    """Run fn(i) for i in range(n) in n threads released together; returns the results in order."""
    barrier, out = threading.Barrier(n), [None] * n

    def go(i):
        barrier.wait()
        out[i] = fn(i)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_commit_load_round_trip(store):
    ids = list(range(100_000)) + [2**31 - 1, 0, 7]
    m1, seen1 = msgs("héllo ✓ 世界", "answer<stop>"), msgs("héllo ✓ 世界", "answer")
    assert store.load("salt", "c1") is None
    assert store.commit_turn("salt", "c1", 0, m1, seen1, ids, bytes(range(16)), owner="r1", when=100.0)
    rec = store.load("salt", "c1")
    assert rec == ConversationRecord("salt", "c1", 1, m1, seen1, ids, bytes(range(16)).hex(), 100.0)
    # turn 2 extends the history; turn 3 is an edit (shares only a prefix) with no seen messages
    m2, ids2 = m1 + msgs("more", "\ud800 lone surrogate"), ids + [5, 6, 7]
    assert store.commit_turn("salt", "c1", 1, m2, m2, ids2, "ab" * 16, when=101.0)
    m3, ids3 = m1[:1] + msgs("edited"), ids[:500] + [9] * 10
    assert store.commit_turn("salt", "c1", 2, m3, None, ids3, None, when=102.0)
    assert store.load("salt", "c1") == ConversationRecord("salt", "c1", 3, m3, None, ids3, None, 102.0)
    hist = store.history("salt", "c1")
    assert [(h.turn, h.messages, h.seen, h.ids, h.owner, h.committed) for h in hist] == [
        (1, m1, seen1, ids, "r1", 100.0), (2, m2, m2, ids2, None, 101.0), (3, m3, None, ids3, None, 102.0)]
    # another salt (and no salt) never sees it; '' is not a salt
    assert store.load("other", "c1") is None and store.load(None, "c1") is None
    assert store.commit_turn(None, "c1", 0, m1, None, [1], None)
    assert store.load(None, "c1").ids == [1] and store.load("salt", "c1").turns == 3
    with pytest.raises(ValueError):
        store.load("", "c1")
    assert [(s.salt, s.cid, s.turns) for s in store.list("salt")] == [("salt", "c1", 3)]
    assert {(s.salt, s.cid) for s in store.list_all()} == {("salt", "c1"), (None, "c1")}
    assert store.touch("salt", "c1", 200.0) and store.load("salt", "c1").last_used == 200.0
    assert not store.touch("salt", "nope", 200.0)


def test_optimistic_check(store):
    assert store.commit_turn("s", "c", 0, msgs("a"), None, [1], None)
    assert not store.commit_turn("s", "c", 0, msgs("b"), None, [2], None)  # the id is taken
    assert not store.commit_turn("s", "c", 2, msgs("b"), None, [2], None)  # not the stored count
    assert not store.commit_turn("s", "new", 1, msgs("b"), None, [2], None)
    assert store.load("s", "c").messages == msgs("a") and store.load("s", "new") is None
    assert store.commit_turn("s", "c", 1, msgs("a", "b"), None, [1, 2], None)
    assert [h.turn for h in store.history("s", "c")] == [1, 2]


def test_two_replicas_racing_on_one_history(target):
    a, b = StateStore.open(target), StateStore.open(target)
    try:
        replicas = [a, b, a, b]
        for rnd in range(5):
            expected = rnd  # round 0 races to create the conversation
            won = race(4, lambda i: replicas[i].commit_turn("s", "c", expected, msgs(f"{rnd}-{i}"), None,
                                                            [rnd, i], None, owner=f"w{i}"))
            assert sum(won) == 1, won
            winner = won.index(True)
            assert a.load("s", "c") == b.load("s", "c")
            assert b.load("s", "c").messages == msgs(f"{rnd}-{winner}")
        assert [h.turn for h in a.history("s", "c")] == [1, 2, 3, 4, 5]
    finally:
        a.close()
        b.close()


def test_delete_frees_the_id(store):
    assert not store.delete("s", "c")
    assert store.commit_turn("s", "c", 0, msgs("a"), None, [1, 2], None)
    assert store.commit_turn("s", "c", 1, msgs("a", "b"), None, [1, 2, 3], None)
    assert store.delete("s", "c")
    assert store.load("s", "c") is None and store.history("s", "c") == [] and store.list("s") == []
    assert store.commit_turn("s", "c", 0, msgs("new"), None, [9], None)
    assert [(h.turn, h.ids) for h in store.history("s", "c")] == [(1, [9])]


def test_tombstone_refuses_commits_until_deleted(store):
    assert not store.tombstone("s", "c", "expired")  # nothing to forget
    assert store.commit_turn("s", "c", 0, msgs("a"), None, [1], None)
    assert store.commit_turn("s", "c", 1, msgs("a", "b"), None, [1, 2], None)
    with pytest.raises(ValueError):
        store.tombstone("s", "c", "bored")
    assert store.tombstone("s", "c", "expired", when=50.0)
    assert store.load("s", "c") == Tombstone("expired", 50.0, 2)
    assert not store.tombstone("s", "c", "evicted")  # the first marker stays
    assert store.history("s", "c") == []
    for expected in (0, 2):
        assert not store.commit_turn("s", "c", expected, msgs("x"), None, [1], None)
    assert not store.touch("s", "c")
    assert [s.tombstone for s in store.list("s")] == ["expired"]
    assert store.list("s", include_tombstones=False) == []
    assert store.delete("s", "c") and store.load("s", "c") is None
    assert store.commit_turn("s", "c", 0, msgs("again"), None, [3], None)
    # old tombstones can be purged, which frees their ids
    assert store.commit_turn("s", "d", 0, msgs("a"), None, [1], None)
    assert store.tombstone("s", "d", "evicted", when=10.0)
    assert store.purge_tombstones(older_than=5.0) == 0
    assert store.purge_tombstones(older_than=20.0) == 1 and store.load("s", "d") is None


def test_leases_across_replicas_and_expiry(target):
    a, b = StateStore.open(target), StateStore.open(target)
    try:
        assert a.acquire_lease("s", "c", "A", 30)
        assert not b.acquire_lease("s", "c", "B", 30)
        assert b.lease_owner("s", "c") == "A" and b.lease_owner("t", "c") is None
        assert not b.release_lease("s", "c", "B") and a.lease_owner("s", "c") == "A"
        # while A holds the lease, B cannot commit as a lease owner
        assert not b.commit_turn("s", "c", 0, msgs("b"), None, [1], None, owner="B")
        assert a.acquire_lease("s", "c", "A", 0.3)  # renewal by its holder, now a short one
        time.sleep(0.6)
        assert a.lease_owner("s", "c") is None
        assert b.acquire_lease("s", "c", "B", 30)  # expired: taken over
        assert not a.acquire_lease("s", "c", "A", 30)
        assert not a.commit_turn("s", "c", 0, msgs("a"), None, [1], None, owner="A")
        assert b.commit_turn("s", "c", 0, msgs("b"), None, [1], None, owner="B")
        assert b.release_lease("s", "c", "B") and a.acquire_lease("s", "c", "A", 30)
        # a free lease raced for by eight threads on two replicas: exactly one wins
        stores = [a, b] * 4
        won = race(8, lambda i: stores[i].acquire_lease("s", "race", f"o{i}", 30))
        assert sum(won) == 1 and a.lease_owner("s", "race") == f"o{won.index(True)}"
    finally:
        a.close()
        b.close()


def test_responses(store):
    assert store.get_response("r0") is None and store.count_responses() == 0
    for i in range(5):
        store.put_response(f"r{i}", "s" if i < 4 else None, {"id": f"r{i}", "output": [i], "t": "✓"},
                           created=1000.0 + i)
    got = store.get_response("r4", salt=None)
    assert got.record == {"id": "r4", "output": [4], "t": "✓"} and got.salt is None and got.created == 1004.0
    assert store.get_response("r4", salt="s") is None  # another tenant's: unknown
    assert not store.delete_response("r4", salt="s") and store.count_responses() == 5
    assert store.get_response("r0", salt="s").last_used > 1004.0  # a lookup is a use
    assert store.get_response("r1", touch=False).last_used == 1001.0
    assert store.prune_responses(3) == ["r1", "r2"]  # least recently used first; r0 was used
    assert store.count_responses() == 3 and store.get_response("r1") is None
    assert store.delete_response("r3", salt="s") and not store.delete_response("r3")
    store.put_response("r0", "s", {"v": 2}, created=2000.0)  # replaced
    assert store.get_response("r0", touch=False).record == {"v": 2}
    assert store.prune_responses(10) == [] and store.count_responses() == 2
    assert sorted(store.prune_responses(0)) == ["r0", "r4"] and store.count_responses() == 0


def test_migrations_are_versioned_and_newer_databases_refused(target):
    with StateStore.open(target) as s:
        assert s.schema_version == SCHEMA_VERSION == max(MIGRATIONS)
        assert s.commit_turn("s", "c", 0, msgs("a"), None, [1], None)
    # newer code with a migration 2 upgrades the database once, keeping its data...
    newer = {**MIGRATIONS, SCHEMA_VERSION + 1: ["CREATE TABLE future_things (x INTEGER)"]}
    db = Database.open(target)
    try:
        assert migrate(db, newer) == SCHEMA_VERSION + 1
        assert migrate(db, newer) == SCHEMA_VERSION + 1  # idempotent
    finally:
        db.close()
    # ...and this code then refuses to open it
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this code"):
        StateStore.open(target)
    db = Database.open(target)
    try:
        with db.transaction(write=False) as tx:
            assert tx.one("SELECT turns FROM conversations")[0] == 1
    finally:
        db.close()


_WRITER = r"""
import os, sys, types
pkg = types.ModuleType("serving")  # serving/__init__ imports the engine (jax); the store needs none of it
pkg.__path__ = [os.path.join(sys.argv[1], "serving")]
sys.modules["serving"] = pkg
from serving.store import StateStore
store = StateStore.open(sys.argv[2])
print("open", flush=True)
n = 0
while True:
    ids = list(range(n * 1000 + 1))
    assert store.commit_turn("s", "c", n, [{"role": "user", "content": str(n)}], None, ids, None)
    n += 1
    print(n, flush=True)
"""


def test_settled_turns_survive_sigkill(target):
    """A writer process is killed (SIGKILL) mid-stream; every turn whose commit had returned is there."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, ROOT, target], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == "open"
        printed = 0
        while printed < 25:
            printed = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with StateStore.open(target) as s:
        rec = s.load("s", "c")
        assert rec.turns >= printed
        assert rec.ids == list(range((rec.turns - 1) * 1000 + 1))
        hist = s.history("s", "c")
        assert len(hist) == rec.turns
        assert all(h.ids == list(range(i * 1000 + 1)) for i, h in enumerate(hist))


def test_threads_commit_concurrently(store):
    def writer(i):
        for n in range(15):
            assert store.commit_turn("s", f"c{i}", n, msgs(*[str(k) for k in range(n + 1)]), None,
                                     list(range(i, i + n + 1)), None)
            assert store.load("s", f"c{i}").turns == n + 1
        return True
    assert all(race(8, writer))
    for i in range(8):
        assert store.load("s", f"c{i}").ids == list(range(i, i + 15))
        assert len(store.history("s", f"c{i}")) == 15


def test_sqlite_file_is_private_and_closed_store_refuses(tmp_path):
    (tmp_path / "dir").mkdir()
    s = StateStore.open(str(tmp_path / "dir"))  # a directory: DIR/state.db
    assert s.backend == "sqlite" and s.description == str(tmp_path / "dir" / "state.db")
    assert s.commit_turn(None, "c", 0, msgs("a"), None, [1], None)
    for suffix in ("", "-wal"):  # the file holds every tenant's messages
        assert stat.S_IMODE(os.stat(s.description + suffix).st_mode) == 0o600
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.load(None, "c")
    with pytest.raises(StoreError):
        StateStore.open(":memory:")
    with StateStore.open("sqlite://" + str(tmp_path / "dir" / "state.db")) as again:
        assert again.load(None, "c").turns == 1
