"""I2 and I4 as a property: random attach / execute / commit / discard / evict sequences over many conversations
never write a shared block or a committed slot, never leak, and keep refcounts exact."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hybrid_jax import ledger as L
from hybrid_jax.cache import Cache, MambaState, PagedKV

BS, NB, NS, MAXLEN = 4, 24, 7, 40


def _tiny_cache() -> Cache:
    # One attention layer, one Mamba layer, scalar entries: enough to fingerprint what sits where.
    return Cache(kv=PagedKV(k=jnp.zeros((1, NB, BS, 1, 1)), v=jnp.zeros((1, NB, BS, 1, 1))),
                 mamba=MambaState(conv=jnp.zeros((1, NS, 1, 1)), ssm=jnp.zeros((1, NS, 1, 1, 1))))


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ledger = L.new_ledger(NB, NS, BS)
        self.cache = _tiny_cache()
        self.pending: dict[str, L.Pending] = {}
        self.length: dict[str, int] = {}      # computed tokens of each pending request
        self.stamp = 0.0
        self.committed_view: dict[str, tuple] = {}  # key -> (kv values, ssm value) at commit

    def _snapshot(self, key):
        t = self.ledger.turns[key]
        k = np.asarray(self.cache.kv.k[0, list(t.blocks), :, 0, 0]).reshape(-1)[:t.length]
        return k.tolist(), float(self.cache.mamba.ssm[0, t.slot, 0, 0, 0])

    @rule(key=st.sampled_from("abcdef"))
    def attach(self, key):
        if key in self.pending:
            return  # one turn in flight per conversation (the lease)
        try:
            led, cache, p = L.attach(self.ledger, self.cache, key)
        except (L.OutOfBlocks, L.OutOfSlots):
            return
        self.ledger, self.cache = led, cache
        self.pending[key], self.length[key] = p, p.attached
        if key in self.ledger.turns:  # the copies hold exactly the committed state
            t = self.ledger.turns[key]
            kv = np.asarray(self.cache.kv.k[0, list(p.blocks), :, 0, 0]).reshape(-1)[:t.length]
            assert kv.tolist() == self.committed_view[key][0]
            assert float(self.cache.mamba.ssm[0, p.slot, 0, 0, 0]) == self.committed_view[key][1]

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), n=st.integers(1, 9))
    def execute(self, data, n):
        key = data.draw(st.sampled_from(sorted(self.pending)))
        p, start = self.pending[key], self.length[key]
        if start + n > MAXLEN:
            return
        try:
            self.ledger, p = L.reserve(self.ledger, p, start + n)
        except L.OutOfBlocks:
            return
        committed_slots = {t.slot for t in self.ledger.turns.values()}
        k = self.cache.kv.k
        for pos in range(start, start + n):
            blk = p.blocks[pos // BS]
            assert self.ledger.refcount[blk] == 1, "I2: write into a shared block"
            assert all(blk not in t.blocks for t in self.ledger.turns.values()), "I2: write into a committed block"
            self.stamp += 1
            k = k.at[0, blk, pos % BS, 0, 0].set(self.stamp)
        assert p.slot not in committed_slots, "I2: write into a committed slot"
        self.cache = dataclasses.replace(self.cache, kv=PagedKV(k=k, v=self.cache.kv.v),
                                         mamba=MambaState(conv=self.cache.mamba.conv,
                                                          ssm=self.cache.mamba.ssm.at[0, p.slot].set(self.stamp)))
        self.pending[key], self.length[key] = p, start + n

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data, ok):
        key = data.draw(st.sampled_from(sorted(self.pending)))
        p = self.pending.pop(key)
        n = self.length.pop(key)
        before = self.ledger
        self.ledger = L.commit(self.ledger, p, ok and n > 0, n)
        if ok and n > 0:
            self.committed_view[key] = self._snapshot(key)
        else:
            # I3: discarding restores every table as if the turn never ran (other requests untouched)
            others = [q for q in self.pending.values()]
            L.check(self.ledger, others)
            assert self.ledger.turns == before.turns

    @rule(key=st.sampled_from("abcdef"))
    def evict(self, key):
        self.ledger = L.evict(self.ledger, key)
        self.committed_view.pop(key, None)

    @invariant()
    def refcounts_exact_and_no_leak(self):
        L.check(self.ledger, list(self.pending.values()))

    @invariant()
    def committed_state_immutable(self):
        for key in self.ledger.turns:
            assert self._snapshot(key) == self.committed_view[key], "I2: committed state changed"

    def teardown(self):
        for p in self.pending.values():
            self.ledger = L.release(self.ledger, p)
        for key in list(self.ledger.turns):
            self.ledger = L.evict(self.ledger, key)
        assert self.ledger.free_blocks == NB - 1 and self.ledger.free_slots == NS - 1, "leak"


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestLedger = LedgerMachine.TestCase
