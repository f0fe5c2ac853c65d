"""The cache's lookup and commit: the device cache, its ledger and the host-memory tier, owned by the loop thread.

Step 4 (attach the committed state of a conversation, or start fresh), growth of a running request (reserve),
step 7 (commit on success, release on failure), and eviction of least recently used committed turns to the host
tier when the pool runs out (I7), with their return on the next hit.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np

from hybrid_jax import ledger as L
from hybrid_jax import offload
from hybrid_jax.cache import init_cache

log = logging.getLogger("serving.cache")
OutOfCache = (L.OutOfBlocks, L.OutOfSlots)


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
        self.busy: set = set()   # conversation keys with a turn in flight: never evicted

    def reset(self):
        """A failed step lost the donated cache: start over empty (conversations recompute their next turn)."""
        self.cache = init_cache(self.cfg, num_blocks=self.plan.num_blocks, block_size=self.block_size,
                                num_slots=self.plan.num_slots, dtype=self.dtype)
        self.ledger = L.new_ledger(self.plan.num_blocks, self.plan.num_slots, self.block_size)
        self.host.clear()
        self.host_bytes = 0

    # ------------------------------------------------------------------ step 4
    def attach(self, key, prompt_len: int, drop_committed: bool) -> L.Pending:
        """Attach `key`'s committed turn (or a fresh state) and reserve blocks for prompt_len tokens.

        Raises OutOfBlocks/OutOfSlots with nothing changed when even eviction cannot make room."""
        if drop_committed and key is not None:
            self.drop(key)
        if self.mode == "none":
            key = None
        align = self.mode == "align"
        if key is not None:
            self._restore_from_host(key)
        self.ledger, self.cache, pending = self._with_eviction(
            lambda: L.attach(self.ledger, self.cache, key, snapshot=align), keep=key)
        if pending.attached >= prompt_len:
            # The last prompt token must run to give the first logits; nothing to reuse then.
            self.ledger = L.release(self.ledger, pending)
            self.ledger, self.cache, pending = L.attach(self.ledger, self.cache, None, snapshot=align)
        try:
            return self.reserve(pending, prompt_len, keep=key)
        except L.OutOfBlocks:
            self.ledger = L.release(self.ledger, pending)
            raise

    def reserve(self, pending: L.Pending, total_len: int, keep=None) -> L.Pending:
        self.ledger, pending = self._with_eviction(lambda: L.reserve(self.ledger, pending, total_len), keep=keep)
        return pending

    def snapshot(self, pending: L.Pending, length: int) -> L.Pending:
        """Align mode: keep the state at a block boundary in the request's snapshot slot."""
        self.cache = L._copy_slot(self.cache, L._ids(pending.slot), L._ids(pending.snap_slot))
        return dataclasses.replace(pending, snap_len=length)

    # ------------------------------------------------------------------ step 7
    def finish(self, pending: L.Pending, key, ok: bool, length: int) -> None:
        """Commit the request's state at `length` as key's turn (ok) or release it (failure, no key, mode none)."""
        if self.mode == "none" or key is None:
            self.ledger = L.release(self.ledger, pending)
        elif self.mode == "align":
            self.ledger = L.commit(self.ledger, pending, ok, pending.snap_len, use_snapshot=True)
        else:
            self.ledger = L.commit(self.ledger, pending, ok, length)

    def release(self, pending: L.Pending) -> None:
        self.ledger = L.release(self.ledger, pending)

    def drop(self, key) -> None:
        """Forget key's committed state on the device and in the host tier."""
        self.ledger = L.evict(self.ledger, key)
        self._drop_host(key)

    # ------------------------------------------------------------------ eviction and the host tier (I7)
    def _with_eviction(self, op, keep=None):
        """Run a ledger operation, evicting least recently used committed turns (never `keep`'s or a busy
        conversation's) until it fits. Operations raise before touching anything, so a retry starts clean."""
        while True:
            try:
                return op()
            except OutOfCache:
                if not self.evict_one(keep):
                    raise

    def evict_one(self, keep=None) -> bool:
        victim = L.lru_victim(self.ledger, exclude=self.busy | {keep})
        if victim is None:
            return False
        if self.host_cache_bytes:
            host = offload.to_host(self.cache, self.ledger.turns[victim])
            if host.nbytes <= self.host_cache_bytes:
                self.host[victim] = host
                self.host_bytes += host.nbytes
                self.counters["offloads"] += 1
                while self.host_bytes > self.host_cache_bytes:  # oldest host copies go first
                    self.host_bytes -= self.host.popitem(last=False)[1].nbytes
        self.ledger = L.evict(self.ledger, victim)
        self.counters["evictions"] += 1
        return True

    def _drop_host(self, key):
        host = self.host.pop(key, None)
        if host is not None:
            self.host_bytes -= host.nbytes
        return host

    def _restore_from_host(self, key):
        """Bring an offloaded committed turn back to the device (a hit without recompute)."""
        host = self._drop_host(key)
        if host is None or key in self.ledger.turns:
            return
        try:
            self.ledger, self.cache = self._with_eviction(
                lambda: offload.from_host(self.ledger, self.cache, key, host), keep=key)
            self.counters["host_restores"] += 1
        except OutOfCache:
            pass  # no room even after eviction: the turn recomputes

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
                    slots_used=ns - led.free_slots, conversations=len(led.turns), host_conversations=len(self.host),
                    host_cache_bytes=self.host_bytes, cache_bytes=self.plan.total_bytes)
