"""The cache's lookup and commit: the device cache, its ledger, the checkpoint index, the host-memory tier and
the disk tier (serving/disk_tier.py, when enabled), owned by the loop thread.

Step 4 (attach the deepest committed checkpoint whose tokens begin the request's, or start fresh), growth of a
running request (reserve), checkpoints published mid-prompt at a message boundary (fork), step 7 (commit a
checkpoint at the end of a turn on success, release on failure), and eviction of least recently used
checkpoints (anonymous and intermediate ones before conversation heads) to the host tier when the pool runs out
(I7), with their return on the next hit. Checkpoints leaving the host tier (or the device, without one) spill
to the disk tier, and states committed at the end of a turn are written behind to it; a hit there reads the
file back through the host tier's programs.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

import jax
import numpy as np

from hybrid_jax import ledger as L
from hybrid_jax import offload
from hybrid_jax.cache import init_cache
from serving.checkpoints import Checkpoint, CheckpointIndex, digest

log = logging.getLogger("serving.cache")
OutOfCache = (L.OutOfBlocks, L.OutOfSlots)
MISS_CAUSES = ("no_checkpoint", "evicted", "not_prefix")
DISK_STATS = dict(disk_hits=0, disk_writes=0, disk_write_drops=0, disk_rejects=0, disk_checkpoints=0, disk_bytes=0,
                  disk_queue=0)


class CacheManager:
    def __init__(self, cfg, plan, dtype, cache_mode: str, host_cache_bytes: int, counters: dict,
                 table_width: int):
        self.cfg, self.plan, self.dtype, self.mode = cfg, plan, dtype, cache_mode
        self.table_width = table_width
        self.block_size = plan.block_size
        self.cache = self._new_cache()
        self.ledger = L.new_ledger(plan.num_blocks, plan.num_slots, plan.block_size)
        self.host_cache_bytes = host_cache_bytes
        self.host: collections.OrderedDict = collections.OrderedDict()
        self.host_bytes = 0
        self.counters = counters
        self.index = CheckpointIndex()
        self.lost_heads: set = set()   # conversations whose head was evicted for good (miss cause)
        self.disk = None               # serving.disk_tier.DiskTier, set by enable_disk
        self._warmed = self._moves_warm = False

    def _new_cache(self):
        """An empty device cache, committed to its devices as the step programs' outputs are (the cache's own
        jitted copies then compile once, for arrays of either origin)."""
        cache = init_cache(self.cfg, num_blocks=self.plan.num_blocks, block_size=self.plan.block_size,
                           num_slots=self.plan.num_slots, dtype=self.dtype)
        return jax.device_put(cache, jax.tree.map(lambda a: a.sharding, cache))

    def reset(self):
        """A failed step lost the donated cache: start over with an empty device. The checkpoints in the host and
        disk tiers stay indexed (their copies are good); those only on the device are forgotten, and their
        conversations recompute their next turn."""
        self.cache = self._new_cache()
        self.ledger = L.new_ledger(self.plan.num_blocks, self.plan.num_slots, self.block_size)
        for cid, ck in list(self.index.meta.items()):
            if not (ck.on_host or ck.on_disk):
                self._lost(cid)

    # ------------------------------------------------------------------ step 4
    def attach(self, salt, feed_T: np.ndarray, key=None, count: bool = True) -> L.Pending:
        """Attach the deepest checkpoint under salt whose tokens begin feed_T (leaving at least its last token to
        compute), or a fresh state, and reserve blocks for all of feed_T. Counts the hit or the miss and its
        cause. Raises OutOfBlocks/OutOfSlots with nothing changed when even eviction cannot make room."""
        cid = self._lookup(salt, feed_T) if self.mode != "none" else None
        if count:
            self._count(cid, salt, key)
        align = self.mode == "align"
        self.ledger, self.cache, pending = self._with_eviction(
            lambda: L.attach(self.ledger, self.cache, cid, snapshot=align), keep={cid})
        try:
            return self.reserve(pending, len(feed_T), keep={cid})
        except L.OutOfBlocks:
            self.ledger = L.release(self.ledger, pending)
            raise

    def _lookup(self, salt, feed_T: np.ndarray) -> int | None:
        """The deepest checkpoint to attach (see attach), brought back to the device first if it waits in the
        host or the disk tier. A stored file that is gone or does not check out is forgotten and the next deepest
        checkpoint is tried; no room to bring one back is a miss."""
        self._forget_gone()
        while True:
            cid = self.index.lookup(salt, feed_T, limit=len(feed_T))
            if cid is None or cid in self.ledger.turns:
                return cid
            if self.index.meta[cid].on_host:
                return cid if self._restore_from_host(cid) else None
            restored = self._restore_from_disk(cid)
            if restored is not None:
                return cid if restored else None

    def _count(self, cid, salt, key) -> None:
        if cid is not None:
            self.counters["hits"] += 1
            return
        self.counters["misses"] += 1
        cause = ("evicted" if key is not None and key in self.lost_heads
                 else "not_prefix" if self.index.has_salt(salt) else "no_checkpoint")
        self.counters["miss_" + cause] += 1

    def reserve(self, pending: L.Pending, total_len: int, keep=frozenset()) -> L.Pending:
        self.ledger, pending = self._with_eviction(lambda: L.reserve(self.ledger, pending, total_len), keep=keep)
        return pending

    # ------------------------------------------------------------------ checkpoints (steps 6 and 7)
    def fork(self, pending: L.Pending, salt, tokens_T: np.ndarray, owner) -> None:
        """Publish the request's state at len(tokens_T) (where it stands) as an intermediate checkpoint, if there
        is room: a message boundary that a re-rendered history will still share."""
        if self.index.duplicate(salt, tokens_T) is not None:
            return
        cid = self.index.new_id()
        try:
            self.ledger, self.cache = self._with_eviction(
                lambda: L.fork(self.ledger, self.cache, pending, len(tokens_T), cid))
        except OutOfCache:
            return
        self.index.add(Checkpoint(cid, salt, tokens_T, digest(tokens_T), owner, boundary=True))

    def commit(self, pending: L.Pending, ok: bool, salt, tokens_T: np.ndarray, owner) -> None:
        """Step 7: on success the request's state after tokens_T becomes a checkpoint (the owner's head);
        on failure, without a cache, or when the very same checkpoint exists, the request's state is released."""
        n = len(tokens_T)
        if ok and pending.source in self.ledger.turns:
            self.ledger = L.touch(self.ledger, pending.source)  # used: it stays longer (LRU)
            self.index.meta[pending.source].last_used = time.time()
        same = self.index.duplicate(salt, tokens_T) if ok and n else None
        if not ok or self.mode == "none" or n == 0 or same is not None:
            self.ledger = L.release(self.ledger, pending)
            if same is not None:
                self._make_head(owner, same)
                self._write_behind(same)
            return
        cid = self.index.new_id()
        pending = dataclasses.replace(pending, key=cid)
        self.ledger = L.commit(self.ledger, pending, True, n, use_snapshot=self.mode == "align")
        self.index.add(Checkpoint(cid, salt, tokens_T, digest(tokens_T), owner))
        self._make_head(owner, cid)
        self._write_behind(cid)

    def _make_head(self, owner, cid: int) -> None:
        if owner is not None:
            self.index.set_head(owner, cid)
            self.lost_heads.discard(owner)
        if not self.index.meta[cid].on_host:
            self.ledger = L.touch(self.ledger, cid)

    def release(self, pending: L.Pending) -> None:
        self.ledger = L.release(self.ledger, pending)

    def snapshot(self, pending: L.Pending, length: int) -> L.Pending:
        """Align mode: keep the state at a block boundary in the request's snapshot slot."""
        self.cache = L.copy_slot_in_place(self.cache, L.host_ids(pending.slot), L.host_ids(pending.snap_slot))
        return dataclasses.replace(pending, snap_len=length)

    def drop_conversation(self, key) -> None:
        """Forget every checkpoint `key` committed, on the device, in the host tier and on disk, and its head."""
        for cid in self.index.owned_by(key):
            self._forget(cid)
        self.index.drop_head(key)
        self.lost_heads.discard(key)

    def _forget(self, cid: int) -> None:
        self.ledger = L.evict(self.ledger, cid)
        self._drop_host(cid)
        ck = self.index.remove(cid)
        if ck.on_disk and self.disk is not None:
            self.disk.delete(self._disk_name(ck))

    def expire(self, older_than: float) -> int:
        """Forget checkpoints unused since wall time older_than (the time-to-live). Returns how many."""
        cids = self.index.idle_since(older_than)
        for cid in cids:
            self._forget(cid)
        return len(cids)

    @property
    def slots_per_request(self) -> int:
        """State slots one running request owns (align mode keeps a block-boundary snapshot too)."""
        return 2 if self.mode == "align" else 1

    @property
    def usable_slots(self) -> int:
        """State slots requests and checkpoints can use (the pool less its scratch slot)."""
        return len(self.ledger.slots) - 1

    def available_slots(self) -> int:
        """Slots a new request could take now: free ones plus those of committed checkpoints on the device (any
        of them can be evicted)."""
        return self.ledger.free_slots + len(self.ledger.turns)

    def owned_slots(self) -> int:
        """Slots held by running requests and finished ones awaiting their settle: they come back."""
        return int(np.sum(self.ledger.slots == L.SLOT_OWNED))

    def head_length(self, key) -> int:
        cid = self.index.heads.get(key)
        return self.index.meta[cid].length if cid is not None else 0

    # ------------------------------------------------------------------ eviction and the host tier (I7)
    def _with_eviction(self, op, keep=frozenset()):
        """Run a ledger operation, evicting checkpoints (never those in `keep`) until it fits. Operations raise
        before touching anything, so a retry starts clean."""
        while True:
            try:
                return op()
            except OutOfCache:
                if not self.evict_one(keep):
                    raise

    def evict_one(self, keep=frozenset()) -> bool:
        """Move the checkpoint that matters least (see CheckpointIndex.eviction_rank) off the device: to the host
        tier when it fits there, else to the disk tier (see _spill); host copies pushed out go to disk too."""
        cands = [(self.index.eviction_rank(cid, t.last_used), cid) for cid, t in self.ledger.turns.items()
                 if cid not in keep]
        if not cands:
            return False
        victim = min(cands)[1]
        ck, turn = self.index.meta[victim], self.ledger.turns[victim]
        host = offload.to_host(self.cache, turn) if self.host_cache_bytes else None
        if host is None or host.nbytes > self.host_cache_bytes:  # straight to disk: copy before the blocks go
            host = host or self._gather_for_disk(ck, turn)
            self.ledger = L.evict(self.ledger, victim)
            self.counters["evictions"] += 1
            self._spill(victim, host)
            return True
        self.ledger = L.evict(self.ledger, victim)
        self.counters["evictions"] += 1
        self.host[victim] = host
        self.host_bytes += host.nbytes
        ck.on_host = True
        self.counters["offloads"] += 1
        while self.host_bytes > self.host_cache_bytes:  # oldest host copies go first
            old, h = self.host.popitem(last=False)
            self.host_bytes -= h.nbytes
            self._spill(old, h)
        return True

    def _gather_for_disk(self, ck: Checkpoint, turn: L.Turn):
        """A dispatched copy of a device checkpoint for the disk tier (None when there is none or it already
        holds a copy, or its queue is full)."""
        if self.disk is None or ck.on_disk:
            return None
        return lambda: offload.gather(self.cache, turn)

    def _spill(self, cid: int, turn) -> None:
        """A checkpoint leaves memory with `turn` (a HostTurn, or a thunk giving an offload.DeviceTurn, or None):
        it stays indexed, as on disk, if the tier holds a copy or queues this one; otherwise it is gone."""
        ck = self.index.meta[cid]
        ck.on_host = False
        if self.disk is not None and not ck.on_disk and turn is not None:
            ck.on_disk = self.disk.submit(self._disk_entry(ck), turn, self._state_bytes(ck.length, padded=True))
        if not ck.on_disk:
            self._lost(cid)

    def _write_behind(self, cid: int) -> None:
        """Queue a copy of a device checkpoint just committed for the disk tier (never waits; dropped, and
        counted, when the queue is full)."""
        ck = self.index.meta[cid]
        if cid in self.ledger.turns and (thunk := self._gather_for_disk(ck, self.ledger.turns[cid])):
            ck.on_disk = self.disk.submit(self._disk_entry(ck), thunk, self._state_bytes(ck.length, padded=True))

    def _lost(self, cid: int) -> None:
        for key, c in list(self.index.heads.items()):
            if c == cid:
                self.lost_heads.add(key)
        self.index.remove(cid)

    def _drop_host(self, cid):
        host = self.host.pop(cid, None)
        if host is not None:
            self.host_bytes -= host.nbytes
        return host

    def _restore_from_host(self, cid) -> bool:
        """Bring an offloaded checkpoint back to the device (a hit without recompute)."""
        host = self._drop_host(cid)
        try:
            self.ledger, self.cache = self._with_eviction(
                lambda: offload.from_host(self.ledger, self.cache, cid, host), keep={cid})
        except OutOfCache:
            self._spill(cid, host)  # no room even after eviction: the turn recomputes
            return False
        self.index.meta[cid].on_host = False
        self.counters["host_restores"] += 1
        return True

    # ------------------------------------------------------------------ the disk tier
    def enable_disk(self, tier) -> None:
        """Use `tier` (serving.disk_tier.DiskTier) below the host tier and index the states it holds; compiles
        the tiers' copy programs if warm-up already ran without them."""
        self.disk = tier
        self._index_disk()
        if self._warmed and not self._moves_warm:
            self._warm_moves()

    def _index_disk(self) -> None:
        """Make the checkpoint index know every state on disk (a request whose tokens begin with one attaches
        it; its owner is kept, so deleting the conversation deletes the file)."""
        if self.disk is None:
            return
        self.disk.drain_gone()
        for e in self.disk.stored():
            same = self.index.duplicate(e.salt, e.tokens)
            if same is not None:
                self.index.meta[same].on_disk = True
                continue
            self.index.add(Checkpoint(self.index.new_id(), e.salt, e.tokens, digest(e.tokens), e.owner,
                                      boundary=e.boundary, on_disk=True, last_used=e.mtime))

    def _forget_gone(self) -> None:
        """Checkpoints whose file the tier deleted to stay within its bytes: kept where they still are, else
        forgotten."""
        for e in self.disk.drain_gone() if self.disk is not None else ():
            cid = self.index.duplicate(e.salt, e.tokens)
            if cid is not None:
                self.index.meta[cid].on_disk = False
                if cid not in self.ledger.turns and not self.index.meta[cid].on_host:
                    self._lost(cid)

    def _restore_from_disk(self, cid) -> bool | None:
        """Read a checkpoint back from disk to the device. None: the file is gone or did not check out (the
        checkpoint is forgotten); False: no room on the device (it stays on disk)."""
        ck = self.index.meta[cid]
        host = self.disk.read(self._disk_name(ck), ck.salt, ck.tokens) if self.disk and ck.on_disk else None
        if host is None:
            ck.on_disk = False
            self._lost(cid)
            return None
        try:
            self.ledger, self.cache = self._with_eviction(
                lambda: offload.from_host(self.ledger, self.cache, cid, host), keep={cid})
        except OutOfCache:
            return False
        self.disk.count("disk_hits")
        return True

    def _disk_name(self, ck: Checkpoint) -> str:
        return self.disk.name_for(ck.salt, ck.digest)

    def _disk_entry(self, ck: Checkpoint):
        from serving.disk_tier import DiskEntry
        return DiskEntry(self._disk_name(ck), ck.salt, ck.tokens, ck.owner, ck.boundary)

    def _state_bytes(self, length: int, padded: bool = False) -> int:
        """Bytes of a checkpoint's blocks and slot (padded: with the copy's power-of-two block count)."""
        n = len(offload.padded_ids(range(L.blocks_for(length, self.block_size)))) if padded else \
            L.blocks_for(length, self.block_size)
        kv, m = self.cache.kv, self.cache.mamba
        per_block = (kv.k.nbytes + kv.v.nbytes) // kv.k.shape[1]
        return n * per_block + (m.conv.nbytes + m.ssm.nbytes) // m.conv.shape[1]

    def warmup(self) -> dict:
        """Compile the cache's own programs: tail-block and slot copies, and the host tier's moves for every
        padded block count up to a full-length sequence. They touch only the scratch block and slot."""
        zero = L.host_ids(0)
        self.cache = L.copy_block_in_place(self.cache, zero, zero)
        self.cache = L.copy_slot_in_place(self.cache, zero, zero)
        self._warmed = True
        n = self._warm_moves() if self.host_cache_bytes or self.disk is not None else 0
        return {"cache_programs": 2 + n}

    def _warm_moves(self) -> int:
        """Compile the host and disk tiers' copies (offload's gather and scatter) for every padded block count
        up to a full-length sequence; they touch only the scratch block and slot. Returns how many."""
        width, n = 1, 0
        while True:
            idx = np.zeros((width,), np.int32)
            # scattered back from host arrays, as a restore from the host tier does (numpy, not device arrays)
            k, v, conv, ssm = jax.device_get(offload.gather_arrays(self.cache, idx, 0))
            self.cache = offload.scatter_arrays(self.cache, idx, 0, k, v, conv, ssm)
            n += 2
            if width >= self.table_width:
                break
            width *= 2
        self._moves_warm = True
        return n

    def stats(self) -> dict:
        led = self.ledger
        nb, ns = len(led.refcount) - 1, len(led.slots) - 1
        return dict(kv_blocks_total=nb, kv_blocks_used=nb - led.free_blocks, slots_total=ns,
                    slots_used=ns - led.free_slots, checkpoints=len(led.turns), host_checkpoints=len(self.host),
                    heads=len(self.index.heads),
                    host_cache_bytes=self.host_bytes, cache_bytes=self.plan.total_bytes,
                    **(self.disk.stats() if self.disk is not None else DISK_STATS))
