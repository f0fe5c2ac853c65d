"""The cache ledger: block refcounts, slot owners and the committed-turn table, with pure operations.

Every operation returns a new `Ledger` (the tables are small host arrays, copied on write), so a failed turn is
undone by keeping the old value, and tests compare ledgers by value. Device-side copies (the copy-on-write tail
block, the Mamba slot) happen inside `attach`, which takes and returns the device `Cache`.

References: each committed turn holds one reference on each of its blocks and owns one slot; each in-flight
request (`Pending`) holds one reference on each block of its table and owns its slot(s). A block with refcount
above one is shared and is never written (I2): a request writes only at positions >= its attached length, which
lie in blocks it owns alone.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable

import jax
import numpy as np

from hybrid_jax.cache import NULL_BLOCK, NULL_SLOT, Cache, copy_block, copy_slot

SLOT_FREE, SLOT_COMMITTED, SLOT_OWNED, SLOT_SCRATCH = 0, 1, 2, 3


class OutOfBlocks(RuntimeError):
    pass


class OutOfSlots(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Turn:
    """A conversation's committed state: the exact state after `length` tokens."""
    length: int
    blocks: tuple[int, ...]   # ceil(length / block_size) KV blocks
    slot: int                 # Mamba conv + SSM state at `length`
    last_used: int


@dataclasses.dataclass(frozen=True)
class Pending:
    """A request's working state. blocks[:shared] are committed blocks shared by reference."""
    key: Hashable | None
    attached: int             # tokens reused from the committed turn (num_computed_tokens at attach)
    blocks: tuple[int, ...]
    shared: int
    slot: int
    snap_slot: int = NULL_SLOT  # align mode: state at the last block boundary reached
    snap_len: int = 0
    source: Hashable | None = None  # the committed turn it attached


@dataclasses.dataclass(frozen=True, eq=False)
class Ledger:
    block_size: int
    refcount: np.ndarray      # [num_blocks] int32; block 0 (scratch) pinned at 1
    slots: np.ndarray         # [num_slots] int8 SLOT_*; slot 0 scratch
    turns: dict               # key -> Turn; never mutated in place
    clock: int = 0

    def __eq__(self, other):
        return (isinstance(other, Ledger) and self.block_size == other.block_size
                and np.array_equal(self.refcount, other.refcount) and np.array_equal(self.slots, other.slots)
                and self.turns == other.turns)

    @property
    def free_blocks(self) -> int:
        return int(np.sum(self.refcount == 0))

    @property
    def free_slots(self) -> int:
        return int(np.sum(self.slots == SLOT_FREE))

    def replace(self, **kw) -> "Ledger":
        """A copy with the fields in kw changed (the ledger is a value: nothing is modified)."""
        return dataclasses.replace(self, **kw)


def new_ledger(num_blocks: int, num_slots: int, block_size: int) -> Ledger:
    rc = np.zeros(num_blocks, np.int32)
    rc[NULL_BLOCK] = 1
    slots = np.zeros(num_slots, np.int8)
    slots[NULL_SLOT] = SLOT_SCRATCH
    return Ledger(block_size=block_size, refcount=rc, slots=slots, turns={})


def blocks_for(length: int, block_size: int) -> int:
    return -(-length // block_size)


def alloc_blocks(rc: np.ndarray, n: int) -> list[int]:
    """Take n free blocks (refcount 0 -> 1) in the refcount array rc, modified in place; raises OutOfBlocks."""
    free = np.flatnonzero(rc == 0)[:n]
    if len(free) < n:
        raise OutOfBlocks(f"need {n} KV blocks, {int(np.sum(rc == 0))} free")
    rc[free] = 1
    return [int(b) for b in free]


def alloc_slot(slots: np.ndarray) -> int:
    """Take the first free slot (SLOT_FREE -> SLOT_OWNED) in the slot array, modified in place; raises
    OutOfSlots."""
    free = np.flatnonzero(slots == SLOT_FREE)
    if len(free) == 0:
        raise OutOfSlots("no free Mamba state slot")
    slots[free[0]] = SLOT_OWNED
    return int(free[0])


def host_ids(*ids) -> np.ndarray:
    """A host int32 index vector: jitted calls take it as is (a jnp array built from a list would be an
    eagerly compiled conversion)."""
    return np.asarray(ids, np.int32)


#: Jitted `cache.copy_block` / `cache.copy_slot` taking (cache, src ids, dst ids); both donate `cache`
#: (argument 0): the caller must use the returned cache.
copy_block_in_place = jax.jit(copy_block, donate_argnums=0)
copy_slot_in_place = jax.jit(copy_slot, donate_argnums=0)


def attach(ledger: Ledger, cache: Cache, key: Hashable | None, *, snapshot: bool = False):
    """Step 4: give a request its own state continuing the committed turn of `key` (if any).

    Shares the committed full blocks (refcount + 1), copies the unaligned tail block into a block the request
    owns, and copies the committed conv + SSM state into a slot the request owns. With snapshot=True a second
    slot is taken for align mode's block-boundary state. Returns (ledger, cache, pending); raises
    OutOfBlocks/OutOfSlots leaving nothing changed (the inputs are not modified).
    """
    rc, slots = ledger.refcount.copy(), ledger.slots.copy()
    slot = alloc_slot(slots)
    snap = alloc_slot(slots) if snapshot else NULL_SLOT
    turn = ledger.turns.get(key) if key is not None else None
    if turn is None:
        return ledger.replace(refcount=rc, slots=slots), cache, Pending(key, 0, (), 0, slot, snap)
    bs = ledger.block_size
    n_full = turn.length // bs
    shared = list(turn.blocks[:n_full])
    rc[shared] += 1
    blocks = list(shared)
    if turn.length % bs:
        (tail,) = alloc_blocks(rc, 1)
        cache = copy_block_in_place(cache, host_ids(turn.blocks[n_full]), host_ids(tail))
        blocks.append(tail)
    cache = copy_slot_in_place(cache, host_ids(turn.slot), host_ids(slot))
    pending = Pending(key, turn.length, tuple(blocks), n_full, slot, snap, turn.length if snapshot else 0, key)
    if snapshot:
        cache = copy_slot_in_place(cache, host_ids(turn.slot), host_ids(snap))
    return ledger.replace(refcount=rc, slots=slots), cache, pending


def fork(ledger: Ledger, cache: Cache, pending: Pending, length: int, key: Hashable):
    """Publish the request's state at `length` (where it stands now) as committed turn `key`, while the request
    goes on: its full blocks are shared (refcount + 1), its tail block and its slot are copied into a block and a
    slot of the new turn. Returns (ledger, cache); raises OutOfBlocks/OutOfSlots with nothing changed."""
    rc, slots = ledger.refcount.copy(), ledger.slots.copy()
    slot = alloc_slot(slots)
    slots[slot] = SLOT_COMMITTED
    n_full = length // ledger.block_size
    blocks = list(pending.blocks[:n_full])
    tail = alloc_blocks(rc, 1) if length % ledger.block_size else []
    rc[blocks] += 1
    if tail:
        cache = copy_block_in_place(cache, host_ids(pending.blocks[n_full]), host_ids(tail[0]))
    cache = copy_slot_in_place(cache, host_ids(pending.slot), host_ids(slot))
    turns = dict(ledger.turns)
    turns[key] = Turn(length, tuple(blocks + tail), slot, ledger.clock + 1)
    return ledger.replace(refcount=rc, slots=slots, turns=turns, clock=ledger.clock + 1), cache


def touch(ledger: Ledger, key: Hashable) -> Ledger:
    """Mark a committed turn as just used (LRU)."""
    turns = dict(ledger.turns)
    turns[key] = dataclasses.replace(turns[key], last_used=ledger.clock + 1)
    return ledger.replace(turns=turns, clock=ledger.clock + 1)


def reserve(ledger: Ledger, pending: Pending, total_len: int) -> tuple[Ledger, Pending]:
    """Allocate owned blocks so the request's table covers total_len tokens. Raises OutOfBlocks unchanged."""
    need = blocks_for(total_len, ledger.block_size) - len(pending.blocks)
    if need <= 0:
        return ledger, pending
    rc = ledger.refcount.copy()
    new = alloc_blocks(rc, need)
    return ledger.replace(refcount=rc), dataclasses.replace(pending, blocks=pending.blocks + tuple(new))


def _release_blocks(rc: np.ndarray, blocks) -> None:
    for b in blocks:
        assert rc[b] > 0, f"block {b} released more often than referenced"
        rc[b] -= 1


def _release_turn(rc: np.ndarray, slots: np.ndarray, turn: Turn) -> None:
    _release_blocks(rc, turn.blocks)
    slots[turn.slot] = SLOT_FREE


def release(ledger: Ledger, pending: Pending) -> Ledger:
    """Discard: drop every reference the request holds. The committed turn is untouched (I3)."""
    rc, slots = ledger.refcount.copy(), ledger.slots.copy()
    _release_blocks(rc, pending.blocks)
    for s in (pending.slot, pending.snap_slot):
        if s != NULL_SLOT:
            slots[s] = SLOT_FREE
    return ledger.replace(refcount=rc, slots=slots)


def publish(ledger: Ledger, pending: Pending, length: int, *, use_snapshot: bool = False) -> Ledger:
    """Commit: the request's state at `length` becomes the conversation's committed turn.

    With use_snapshot (align mode) the snapshot slot, taken at `length` (a block boundary), is published instead
    of the working slot. length == 0 drops the conversation's turn. The previous turn's references are released;
    blocks beyond `length` and the unused slot go back to the pool.
    """
    rc, slots = ledger.refcount.copy(), ledger.slots.copy()
    turns = dict(ledger.turns)
    old = turns.pop(pending.key, None)
    if old is not None:
        _release_turn(rc, slots, old)
    keep = blocks_for(length, ledger.block_size) if length > 0 else 0
    _release_blocks(rc, pending.blocks[keep:])
    slot, other = (pending.snap_slot, pending.slot) if use_snapshot else (pending.slot, pending.snap_slot)
    for s in (other,):
        if s != NULL_SLOT:
            slots[s] = SLOT_FREE
    if length > 0:
        slots[slot] = SLOT_COMMITTED
        turns[pending.key] = Turn(length, pending.blocks[:keep], slot, ledger.clock + 1)
    else:
        _release_blocks(rc, pending.blocks[:keep])
        slots[slot] = SLOT_FREE
    return ledger.replace(refcount=rc, slots=slots, turns=turns, clock=ledger.clock + 1)


def commit(ledger: Ledger, pending: Pending, ok: bool, length: int, *, use_snapshot: bool = False) -> Ledger:
    """Step 7: publish on success, discard on failure."""
    return publish(ledger, pending, length, use_snapshot=use_snapshot) if ok else release(ledger, pending)


def evict(ledger: Ledger, key: Hashable) -> Ledger:
    """Forget a committed turn. Blocks still referenced by in-flight requests live on until they finish."""
    if key not in ledger.turns:
        return ledger
    rc, slots = ledger.refcount.copy(), ledger.slots.copy()
    turns = dict(ledger.turns)
    _release_turn(rc, slots, turns.pop(key))
    return ledger.replace(refcount=rc, slots=slots, turns=turns)


def check(ledger: Ledger, pendings=()) -> None:
    """Assert I4: refcounts equal the references held; slots are owned by exactly what claims them."""
    expect = np.zeros_like(ledger.refcount)
    expect[NULL_BLOCK] = 1
    slot_expect = np.zeros_like(ledger.slots)
    slot_expect[NULL_SLOT] = SLOT_SCRATCH
    for t in ledger.turns.values():
        np.add.at(expect, list(t.blocks), 1)
        assert len(t.blocks) == blocks_for(t.length, ledger.block_size)
        assert slot_expect[t.slot] == SLOT_FREE
        slot_expect[t.slot] = SLOT_COMMITTED
    for p in pendings:
        np.add.at(expect, list(p.blocks), 1)
        for s in (p.slot, p.snap_slot):
            if s != NULL_SLOT:
                assert slot_expect[s] == SLOT_FREE
                slot_expect[s] = SLOT_OWNED
    assert np.array_equal(expect, ledger.refcount), "refcounts differ from references held"
    assert np.array_equal(slot_expect, ledger.slots), "slot owners differ"
