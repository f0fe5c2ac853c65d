"""The disk tier (serving/disk_tier.py): states spilled from the host tier and written behind at commit come back
exactly, survive a restart without a graceful save, and a torn, foreign or mismatching file is never loaded.
Real engines on the embedded default model, all with the same pool shapes so that they share compiled programs."""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time

import jax
import numpy as np
import pytest

from serving import Engine, disk_tier
from serving.checkpoints import digest

COMMON = dict(block_size=16, max_model_len=256, max_num_seqs=2, num_blocks=40, num_slots=6, max_prefill_tokens=64)
SAMPLE = dict(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ref():
    e = Engine.from_pretrained(None, cache_mode="none", **COMMON)
    yield e
    e.shutdown()


def _engine(directory, capacity=64 << 20, host_cache_memory=0, **tier_kw):
    e = Engine.from_pretrained(None, host_cache_memory=host_cache_memory, **COMMON)
    disk_tier.enable(e, str(directory), capacity, **tier_kw)
    return e


def _turns(seed, n=3):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, size=k).tolist() for k in (37, 20, 50)[:n]]


def _round_robin(e, convs, rounds, salt="s"):
    """Each conversation's state is evicted from the small pool before its next turn."""
    got = {c: [] for c in convs}
    for r in range(rounds):
        for c, turns in convs.items():
            got[c].append(e.complete(turns[r], conversation_id=c, cache_salt=salt, **SAMPLE))
    return got


def _want(ref, convs, rounds, tag):
    return {c: [ref.complete(t, conversation_id=f"{c}-{tag}", cache_salt="s", **SAMPLE) for t in turns[:rounds]]
            for c, turns in convs.items()}


def _committed(e, c, salt="s"):
    return e.conversations.get((salt, c)).ids


def _name(fp, salt, tokens):
    return disk_tier.state_name(fp, salt, digest(np.asarray(tokens, np.int32)))


@pytest.mark.parametrize("host", [0, "200KiB"])
def test_spill_and_read_back_is_exact(tmp_path, ref, host, caplog):
    """Evicted states go to disk (from the device, or pushed out of a small host tier) and come back on the next
    turn: every turn after the first attaches its whole history, the output equals an uncached run's, and the
    copies use the programs the host tier's warm-up compiled (none is compiled while serving)."""
    e = _engine(tmp_path, host_cache_memory=host)
    try:
        e._call(e.caches._warm_moves)
        convs = {f"spill-{i}": _turns(10 + i) for i in range(6)}
        jax.config.update("jax_log_compiles", True)  # the engine compiles on its own thread: not a context
        try:
            with caplog.at_level(logging.WARNING, logger="jax"):
                got = _round_robin(e, convs, 3)
        finally:
            jax.config.update("jax_log_compiles", False)
        want = _want(ref, convs, 3, f"spill{host}")
        for c in convs:
            assert [r.token_ids for r in got[c]] == [r.token_ids for r in want[c]], c
            for prev, r in zip(got[c], got[c][1:]):
                assert r.cached_tokens == prev.prompt_tokens + prev.completion_tokens - 1
        s = e.stats()
        assert s["disk_hits"] > 0 and s["disk_writes"] > 0 and s["disk_rejects"] == 0
        assert (s["offloads"] > 0) == bool(host)  # with a host tier, states pass through it on their way out
        compiled = [r.getMessage()[:40] for r in caplog.records if "Compiling" in r.getMessage()]
        assert not [m for m in compiled if "gather_arrays" in m or "scatter_arrays" in m], compiled
    finally:
        e.shutdown()


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, ref):
    """A directory left by an engine that wrote its states behind and stopped without a graceful save, with
    the token ids its conversations committed."""
    directory = tmp_path_factory.mktemp("crashed")
    e = _engine(directory)
    convs = {f"crash-{i}": _turns(30 + i, n=2) for i in range(4)}
    _round_robin(e, convs, 2)
    assert e.caches.disk.flush(30)
    ids = {c: _committed(e, c) for c in convs}
    fp = e.caches.disk.fp
    e.shutdown()  # no save_state: only what the write-behind put on disk remains
    return directory, ids, fp


def _resume(e, ref, ids, salt="s"):
    """Continue each conversation after a restart by sending its committed ids and a new suffix."""
    out = {}
    for c, prior in ids.items():
        r = e.complete(prior + [5, 6, 7], cache_salt=salt, **SAMPLE)
        w = ref.complete(prior + [5, 6, 7], cache_salt="s", **SAMPLE)
        assert r.token_ids == w.token_ids, c
        out[c] = r
    return out


def _copy(directory, to):
    os.makedirs(to / disk_tier.SUBDIR)
    for name in os.listdir(directory / disk_tier.SUBDIR):
        (to / disk_tier.SUBDIR / name).write_bytes((directory / disk_tier.SUBDIR / name).read_bytes())
    return to / disk_tier.SUBDIR


def test_restart_attaches_states_written_behind(tmp_path, crashed, ref):
    directory, ids, _ = crashed
    _copy(directory, tmp_path)
    e = _engine(tmp_path)
    try:
        got = _resume(e, ref, ids)
        for c, prior in ids.items():
            assert got[c].cached_tokens == len(prior) - 1  # the head: all but the last sampled token
        assert e.stats()["disk_hits"] == len(ids)
    finally:
        e.shutdown()


def _rewrite_header(path, **changes):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12:12 + n]) | changes
    new = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(raw[:8] + struct.pack("<I", len(new)) + new + raw[12 + n:])


def test_torn_foreign_and_mismatching_files_are_never_loaded(tmp_path, crashed, ref):
    directory, ids, fp = crashed
    states = _copy(directory, tmp_path)
    heads = {c: states / _name(fp, "s", prior[:-1]) for c, prior in ids.items()}
    torn, foreign, other_fp, corrupt = (heads[c] for c in sorted(ids))
    with open(torn, "r+b") as f:
        f.truncate(os.path.getsize(torn) // 2)
    with open(foreign, "wb") as f:
        f.write(os.urandom(4096))
    _rewrite_header(other_fp, fingerprint="0" * 64)  # whole and consistent, but of another model setup
    with open(corrupt, "r+b") as f:  # a flipped byte in the state itself: only the checksum can tell
        f.seek(-100, os.SEEK_END)
        b = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    (states / "notes.txt").write_text("not ours")
    e = _engine(tmp_path)
    try:
        assert e.stats()["disk_rejects"] == 3  # found at start: torn, foreign, another fingerprint
        got = _resume(e, ref, ids)  # exact, whatever was on disk
        for c, prior in ids.items():
            assert got[c].cached_tokens < len(prior) - 1  # the previous turn's state at most
            assert not os.path.exists(heads[c])
        assert e.stats()["disk_rejects"] == 4  # and the corrupt one when read
        assert (states / "notes.txt").read_text() == "not ours"
    finally:
        e.shutdown()


def test_another_salt_never_hits(tmp_path, crashed, ref):
    directory, ids, _ = crashed
    e = _engine(directory)
    try:
        c, prior = sorted(ids.items())[0]
        for salt in ("other", None):
            r = e.complete(prior + [5, 6, 7], cache_salt=salt, **SAMPLE)
            assert r.cached_tokens == 0
        assert e.stats()["disk_hits"] == 0
        assert e.complete(prior + [5, 6, 7], cache_salt="s", **SAMPLE).cached_tokens == len(prior) - 1
    finally:
        e.shutdown()


def test_bytes_stay_within_the_budget_and_delete_removes_files(tmp_path, ref):
    cap = 400_000  # two or three of these states
    e = _engine(tmp_path, capacity=cap)
    try:
        convs = {f"cap-{i}": _turns(50 + i, n=2) for i in range(6)}
        got = _round_robin(e, convs, 2)
        want = _want(ref, convs, 2, "cap")
        for c in convs:
            assert [r.token_ids for r in got[c]] == [r.token_ids for r in want[c]], c
        tier = e.caches.disk
        assert tier.flush(30)
        on_disk = sum(os.path.getsize(os.path.join(tier.dir, n)) for n in os.listdir(tier.dir))
        assert 0 < e.stats()["disk_bytes"] == on_disk <= cap
        last = list(convs)[-1]
        mine = [os.path.join(tier.dir, n) for n, x in tier.entries.items() if x.owner == ("s", last)]
        assert mine and e.delete_conversation(last, "s")
        assert not any(os.path.exists(p) for p in mine)
    finally:
        e.shutdown()


def test_write_behind_never_blocks_the_engine(tmp_path, ref):
    """A stalled disk: the writer holds one state, the queue (one item) another, the rest are dropped and
    counted; requests finish meanwhile."""
    e = _engine(tmp_path, queue_items=1)
    tier, release = e.caches.disk, threading.Event()
    real = tier._write
    tier._write = lambda entry, turn: (release.wait(60), real(entry, turn))[1]
    try:
        t = time.perf_counter()
        rs = [e.complete(_turns(70 + i, n=1)[0], conversation_id=f"wb-{i}", cache_salt="s", **SAMPLE)
              for i in range(5)]
        assert all(r.finish_reason == "length" for r in rs)
        assert time.perf_counter() - t < 55
        s = e.stats()
        assert s["disk_write_drops"] == 3 and s["disk_writes"] == 0 and s["disk_queue"] == 1
        release.set()
        assert tier.flush(30)
        assert e.stats()["disk_writes"] == 2
    finally:
        release.set()
        e.shutdown()
