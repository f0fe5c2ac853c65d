"""The disk tier: committed states on local disk under `<cache-dir>/states/`, below the host tier.

A checkpoint leaves the host tier (or the device, without a host tier) for a file here instead of being dropped,
and every state committed at the end of a turn is also written behind, so that after a crash a request whose
prompt begins with a stored state's tokens, under the same salt, attaches it. One file per state, content-
addressed by the engine's fingerprint, the salt and the token digest (serving/state_file.py gives the format and
its checks). A file that does not check out is deleted, counted (disk_rejects) and the request misses; files of
another model setup are deleted at start. The bytes on disk stay within `capacity`: least recently used files go
first (the checkpoint index forgets them, see `drain_gone`).

Threads: the engine's loop thread calls `submit`, `read`, `delete`, `drain_gone`, `stored` and `count`; one
writer thread ("disk-writer") copies queued states to the host and writes them. A queue bounded in items and
bytes sits between them: `submit` never waits, and a write that does not fit is dropped and counted
(disk_write_drops). `stats`, `flush` and `close` may be called from any thread. One lock guards the entries,
the queue and the counters; file reads and writes run outside it.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time

import numpy as np

from hybrid_jax.offload import HostTurn
from serving.state_file import DiskEntry, Rejected, StateFormat, layout_of, remove, state_name

log = logging.getLogger("serving.disk")
SUBDIR = "states"
_NAME = re.compile(r"^([0-9a-f]{16})-[0-9a-f]{32}\.state$")
_TMP = re.compile(r"^\.[0-9a-f]{16}-[0-9a-f]{32}\.state\.\d+\.tmp$")
__all__ = ["SUBDIR", "DiskEntry", "DiskTier", "enable", "state_name"]


@dataclasses.dataclass(eq=False)
class _Write:
    entry: DiskEntry
    turn: object      # HostTurn, or offload.DeviceTurn (copied to the host by the writer)
    nbytes: int


def enable(engine, directory: str, capacity: int, **kw) -> "DiskTier":
    """Give `engine` a disk tier of `capacity` bytes under directory/states (kw: DiskTier's queue bounds) and
    index the states already there. Call it from any thread but the engine's loop, after a saved state was
    loaded (persist.load): states both there and on disk are then indexed once."""
    from serving.fingerprint import fingerprint
    from serving.persist import MEMO
    fp = fingerprint(engine, os.path.join(directory, MEMO))
    caches = engine.caches
    fmt = StateFormat(hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest(),
                      layout_of(caches.cache), caches.block_size, caches.table_width)
    tier = DiskTier(directory, capacity, fmt, **kw)
    engine._call(lambda: caches.enable_disk(tier))
    return tier


class DiskTier:
    def __init__(self, directory: str, capacity: int, fmt: StateFormat, queue_items: int = 16,
                 queue_bytes: int = 512 << 20):
        """A tier of at most `capacity` bytes under directory/states for the states of one engine (`fmt`).
        Indexes the files already there (deleting ours that do not check out) and starts the writer thread."""
        self.dir = os.path.join(os.path.abspath(directory), SUBDIR)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.capacity, self.format, self.fp = int(capacity), fmt, fmt.fp
        self.queue_items, self.queue_bytes = queue_items, queue_bytes
        self._lock = threading.Condition()
        self.entries: collections.OrderedDict[str, DiskEntry] = collections.OrderedDict()  # least recent first
        self._pending: dict[str, _Write] = {}   # queued or being written
        self._queue: collections.deque[_Write] = collections.deque()
        self._queued_bytes = 0
        self._gone: list[DiskEntry] = []        # evicted by the writer, for the loop to forget
        self.bytes = 0
        self.counts = dict(disk_hits=0, disk_writes=0, disk_write_drops=0, disk_rejects=0)
        self._stop = False
        self._scan()
        self._thread = threading.Thread(target=self._run, name="disk-writer", daemon=True)
        self._thread.start()

    def name_for(self, salt, token_digest: bytes) -> str:
        return state_name(self.fp, salt, token_digest)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # ------------------------------------------------------------------ the loop thread's calls
    def submit(self, entry: DiskEntry, turn, nbytes: int) -> bool:
        """Queue `turn` (a HostTurn, or a thunk that dispatches a device copy, an offload.DeviceTurn, called only
        if queued; donated: the writer owns it now) to be written as `entry`. Never waits: False, counted as a
        drop, when the queue is full or the state cannot fit the tier. True when it is queued or stored."""
        with self._lock:
            if entry.name in self.entries or entry.name in self._pending:
                return True
            if (len(self._queue) >= self.queue_items or self._queued_bytes + nbytes > self.queue_bytes
                    or nbytes > self.capacity or self._stop):
                self.counts["disk_write_drops"] += 1
                return False
            try:
                w = _Write(entry, turn() if callable(turn) else turn, nbytes)
            except Exception:  # the device copy could not even be dispatched: no write, the engine goes on
                log.exception("disk tier: could not copy %s", entry.name)
                self.counts["disk_write_drops"] += 1
                return False
            self._queue.append(w)
            self._queued_bytes += nbytes
            self._pending[entry.name] = w
            self._lock.notify_all()
            return True

    def read(self, name: str, salt, tokens: np.ndarray) -> HostTurn | None:
        """The state stored as `name` for exactly these salt and tokens, or None: a missing file is a miss, one
        that does not check out is deleted and counted. A state still queued comes from memory."""
        with self._lock:
            w = self._pending.get(name)
        if w is not None:
            try:
                turn = w.turn if isinstance(w.turn, HostTurn) else w.turn.fetch()
            except Exception:  # the copy failed with the step it followed: a miss
                return None
            return turn if np.array_equal(w.entry.tokens, tokens) and w.entry.salt == salt else None
        try:
            turn = self.format.load(self._path(name), salt, tokens)
        except FileNotFoundError:
            with self._lock:
                self._drop_entry(name)
            return None
        except (Rejected, OSError, ValueError) as e:
            self._reject(name, e)
            return None
        self.touch(name)
        return turn

    def touch(self, name: str) -> None:
        with self._lock:
            if name in self.entries:
                self.entries.move_to_end(name)

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def delete(self, name: str) -> None:
        """Forget a state: cancel its queued write (or delete what it writes) and delete its file."""
        with self._lock:
            w = self._pending.pop(name, None)
            if w is not None and w in self._queue:
                self._queue.remove(w)
                self._queued_bytes -= w.nbytes
            self._drop_entry(name)
            self._lock.notify_all()

    def stored(self) -> list[DiskEntry]:
        """Every state on disk or queued."""
        with self._lock:
            return list(self.entries.values()) + [w.entry for w in self._pending.values()]

    def drain_gone(self) -> list[DiskEntry]:
        """The entries the writer evicted since the last call (the loop forgets their checkpoints)."""
        with self._lock:
            gone, self._gone = self._gone, []
            return gone

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counts, disk_checkpoints=len(self.entries), disk_bytes=self.bytes,
                        disk_queue=len(self._queue))

    # ------------------------------------------------------------------ any thread
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done; False if the timeout passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending or self._stop, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued writes (at most timeout seconds) and stop the writer."""
        self.flush(timeout)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ bookkeeping (lock held)
    def _drop_entry(self, name: str) -> None:
        e = self.entries.pop(name, None)
        if e is not None:
            self.bytes -= e.nbytes
            remove(self._path(name))

    def _admit(self, entry: DiskEntry) -> None:
        """Count a written file in, then delete the least recently used others beyond the capacity."""
        old = self.entries.pop(entry.name, None)
        self.bytes += entry.nbytes - (old.nbytes if old else 0)
        self.entries[entry.name] = entry
        while self.bytes > self.capacity and self.entries:  # the new one too, if it alone is too big
            name, victim = next(iter(self.entries.items()))
            self._drop_entry(name)
            self._gone.append(victim)

    def _reject(self, name: str, why) -> None:
        log.warning("disk tier: %s does not check out (%s); deleted", name, why)
        with self._lock:
            self.counts["disk_rejects"] += 1
            if name in self.entries:
                self._drop_entry(name)
            else:
                remove(self._path(name))

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._stop)
                if self._stop:
                    return
                w = self._queue.popleft()
                self._queued_bytes -= w.nbytes
            try:
                turn = w.turn if isinstance(w.turn, HostTurn) else w.turn.fetch()
                w.entry.nbytes = self._write(w.entry, turn)
                w.entry.mtime = time.time()
            except Exception:  # a full disk, a failed device copy: this write is lost, the engine goes on
                log.exception("disk tier: could not write %s", w.entry.name)
                with self._lock:
                    self.counts["disk_write_drops"] += 1
                    if self._pending.get(w.entry.name) is w:
                        del self._pending[w.entry.name]
                    self._lock.notify_all()
                continue
            with self._lock:
                if w.entry.name in self._pending:  # not deleted meanwhile
                    if self._pending[w.entry.name] is w:
                        del self._pending[w.entry.name]
                    self._admit(w.entry)
                    self.counts["disk_writes"] += 1
                else:
                    remove(self._path(w.entry.name))
                self._lock.notify_all()

    def _write(self, entry: DiskEntry, turn: HostTurn) -> int:
        return self.format.write(self.dir, entry, turn)

    # ------------------------------------------------------------------ reading and checking files
    def _scan(self) -> None:
        """Index the files already on disk (after a restart or a crash), least recently written first; delete
        leftovers of interrupted writes, our files of another model setup and any that does not check out."""
        found, other = [], 0
        for name in os.listdir(self.dir):
            path = self._path(name)
            if _TMP.match(name):
                remove(path)
                continue
            m = _NAME.match(name)
            if not m:
                continue  # not ours: never loaded, never deleted
            if m.group(1) != self.fp[:16]:
                remove(path)
                other += 1
                continue
            try:
                with open(path, "rb") as f:
                    h, tokens, size = self.format.header(f, name)
                    st = os.fstat(f.fileno())
                if st.st_size != size:
                    raise Rejected("torn: the file has the wrong size")
            except (Rejected, OSError, ValueError) as e:
                self._reject(name, e)
                continue
            owner = tuple(h["owner"]) if isinstance(h.get("owner"), list) and len(h["owner"]) == 2 else None
            found.append(DiskEntry(name, h["salt"], tokens, owner, bool(h.get("boundary")), size, st.st_mtime))
        for e in sorted(found, key=lambda e: e.mtime):
            self._admit(e)
        self._gone.clear()
        if other:
            log.info("disk tier: deleted %d states of another model setup", other)
        log.info("disk tier: %d states (%.1f MiB) in %s", len(self.entries), self.bytes / 2**20, self.dir)
