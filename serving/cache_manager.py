"""The cache's lookup and commit: the device cache, its ledger, the checkpoint index and the host-memory tier,
owned by the loop thread.

Step 4 (attach the deepest committed checkpoint whose tokens begin the request's, or start fresh), growth of a
running request (reserve), checkpoints published mid-prompt at a message boundary (fork), step 7 (commit a
checkpoint at the end of a turn on success, release on failure), and eviction of least recently used
checkpoints (anonymous and intermediate ones before conversation heads) to the host tier when the pool runs out
(I7), with their return on the next hit.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

import numpy as np

from hybrid_jax import ledger as L
from hybrid_jax import offload
from hybrid_jax.cache import init_cache
from serving.checkpoints import Checkpoint, CheckpointIndex, digest

log = logging.getLogger("serving.cache")
OutOfCache = (L.OutOfBlocks, L.OutOfSlots)
MISS_CAUSES = ("no_checkpoint", "evicted", "not_prefix")


class CacheManager:
    def __init__(self, cfg, plan, dtype, cache_mode: str, host_cache_bytes: int, counters: dict,
                 table_width: int):
        self.cfg, self.plan, self.dtype, self.mode = cfg, plan, dtype, cache_mode
        self.table_width = table_width
        self.block_size = plan.block_size
        self.cache = init_cache(cfg, num_blocks=plan.num_blocks, block_size=plan.block_size,
                                num_slots=plan.num_slots, dtype=dtype)
        self.ledger = L.new_ledger(plan.num_blocks, plan.num_slots, plan.block_size)
        self.host_cache_bytes = host_cache_bytes
        self.host: collections.OrderedDict = collections.OrderedDict()
        self.host_bytes = 0
        self.counters = counters
        self.index = CheckpointIndex()
        self.lost_heads: set = set()   # conversations whose head was evicted for good (miss cause)

    def reset(self):
        """A failed step lost the donated cache: start over empty (conversations recompute their next turn)."""
        self.cache = init_cache(self.cfg, num_blocks=self.plan.num_blocks, block_size=self.block_size,
                                num_slots=self.plan.num_slots, dtype=self.dtype)
        self.ledger = L.new_ledger(self.plan.num_blocks, self.plan.num_slots, self.block_size)
        self.host.clear()
        self.host_bytes = 0
        self.index = CheckpointIndex()

    # ------------------------------------------------------------------ step 4
    def attach(self, salt, feed_T: np.ndarray, key=None, count: bool = True) -> L.Pending:
        """Attach the deepest checkpoint under salt whose tokens begin feed_T (leaving at least its last token to
        compute), or a fresh state, and reserve blocks for all of feed_T. Counts the hit or the miss and its
        cause. Raises OutOfBlocks/OutOfSlots with nothing changed when even eviction cannot make room."""
        cid = self.index.lookup(salt, feed_T, limit=len(feed_T)) if self.mode != "none" else None
        if cid is not None and self.index.meta[cid].on_host:
            if not self._restore_from_host(cid):
                cid = None
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
            return
        cid = self.index.new_id()
        pending = dataclasses.replace(pending, key=cid)
        self.ledger = L.commit(self.ledger, pending, True, n, use_snapshot=self.mode == "align")
        self.index.add(Checkpoint(cid, salt, tokens_T, digest(tokens_T), owner))
        self._make_head(owner, cid)

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
        self.cache = L._copy_slot(self.cache, L._ids(pending.slot), L._ids(pending.snap_slot))
        return dataclasses.replace(pending, snap_len=length)

    def drop_conversation(self, key) -> None:
        """Forget every checkpoint `key` committed, on the device and in the host tier, and its head."""
        for cid in self.index.owned_by(key):
            self._forget(cid)
        self.index.drop_head(key)
        self.lost_heads.discard(key)

    def _forget(self, cid: int) -> None:
        self.ledger = L.evict(self.ledger, cid)
        self._drop_host(cid)
        self.index.remove(cid)

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
        tier when it fits there, else forget it."""
        cands = [(self.index.eviction_rank(cid, t.last_used), cid) for cid, t in self.ledger.turns.items()
                 if cid not in keep]
        if not cands:
            return False
        victim = min(cands)[1]
        ck = self.index.meta[victim]
        host = offload.to_host(self.cache, self.ledger.turns[victim]) if self.host_cache_bytes else None
        self.ledger = L.evict(self.ledger, victim)
        self.counters["evictions"] += 1
        if host is not None and host.nbytes <= self.host_cache_bytes:
            self.host[victim] = host
            self.host_bytes += host.nbytes
            ck.on_host = True
            self.counters["offloads"] += 1
            while self.host_bytes > self.host_cache_bytes:  # oldest host copies go first
                old, h = self.host.popitem(last=False)
                self.host_bytes -= h.nbytes
                self._lost(old)
        else:
            self._lost(victim)
        return True

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
            self._lost(cid)  # no room even after eviction: the turn recomputes
            return False
        self.index.meta[cid].on_host = False
        self.counters["host_restores"] += 1
        return True

    def warmup(self) -> dict:
        """Compile the cache's own programs: tail-block and slot copies, and the host tier's moves for every
        padded block count up to a full-length sequence. They touch only the scratch block and slot."""
        zero = L._ids(0)
        self.cache = L._copy_block(self.cache, zero, zero)
        self.cache = L._copy_slot(self.cache, zero, zero)
        n = 0
        if self.host_cache_bytes:
            width = 1
            while True:
                idx = np.zeros((width,), np.int32)
                k, v, conv, ssm = offload._gather(self.cache, idx, 0)
                self.cache = offload._scatter(self.cache, idx, 0, k, v, conv, ssm)
                n += 2
                if width >= self.table_width:
                    break
                width *= 2
        return {"cache_programs": 2 + n}

    def stats(self) -> dict:
        led = self.ledger
        nb, ns = len(led.refcount) - 1, len(led.slots) - 1
        return dict(kv_blocks_total=nb, kv_blocks_used=nb - led.free_blocks, slots_total=ns,
                    slots_used=ns - led.free_slots, checkpoints=len(led.turns), host_checkpoints=len(self.host),
                    heads=len(self.index.heads),
                    host_cache_bytes=self.host_bytes, cache_bytes=self.plan.total_bytes)
