"""Moving an evicted committed turn to host memory and back (I7 without recompute when host memory allows).

Index vectors are padded to power-of-two lengths (padding points at the scratch block / slot 0), so the number of
compiled gather/scatter shapes stays logarithmic in the history length.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from hybrid_jax import ledger as L
from hybrid_jax.cache import NULL_BLOCK, Cache, MambaState, PagedKV


@dataclasses.dataclass(frozen=True)
class HostTurn:
    length: int
    k: np.ndarray     # [attn_layers, n_blocks, block_size, kv_heads, head_dim]
    v: np.ndarray
    conv: np.ndarray  # [mamba_layers, conv_dim, d_conv - 1]
    ssm: np.ndarray   # [mamba_layers, heads, head_dim, d_state]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.conv.nbytes + self.ssm.nbytes


def padded_ids(ids, fill=NULL_BLOCK) -> np.ndarray:
    """ids as an int32 vector padded with `fill` to the next power-of-two length."""
    n = 1
    while n < len(ids):
        n *= 2
    return np.asarray(list(ids) + [fill] * (n - len(ids)), np.int32)


@jax.jit
def gather_arrays(cache: Cache, blocks, slot):
    """(k, v, conv, ssm) of the KV blocks `blocks` and the Mamba slot `slot`, copied out of the cache (donates
    nothing)."""
    return cache.kv.k[:, blocks], cache.kv.v[:, blocks], cache.mamba.conv[:, slot], cache.mamba.ssm[:, slot]


@functools.partial(jax.jit, donate_argnums=0)
def scatter_arrays(cache: Cache, blocks, slot, k, v, conv, ssm):
    """The cache with (k, v, conv, ssm) written into blocks `blocks` and slot `slot`; donates `cache`
    (argument 0): the caller must use the returned cache."""
    return Cache(kv=PagedKV(k=cache.kv.k.at[:, blocks].set(k), v=cache.kv.v.at[:, blocks].set(v)),
                 mamba=MambaState(conv=cache.mamba.conv.at[:, slot].set(conv),
                                  ssm=cache.mamba.ssm.at[:, slot].set(ssm)))


@dataclasses.dataclass(frozen=True)
class DeviceTurn:
    """A committed turn's blocks and slot gathered into arrays of their own (the copy is dispatched, not awaited):
    later steps may reuse the blocks and slot, and `fetch` still returns the turn as it was committed."""
    length: int
    n_blocks: int
    arrays: tuple     # (k, v, conv, ssm), k and v padded to a power-of-two block count

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def fetch(self) -> HostTurn:
        """Wait for the copy and return it in host memory (any thread may call this)."""
        n = self.n_blocks
        k, v, conv, ssm = jax.device_get(self.arrays)
        return HostTurn(self.length, np.asarray(k[:, :n]), np.asarray(v[:, :n]), np.asarray(conv), np.asarray(ssm))


def gather(cache: Cache, turn: L.Turn) -> DeviceTurn:
    """Start copying a committed turn's blocks and state slot out of the cache, without waiting (the same
    compiled programs as `to_host`; the ledger is not changed)."""
    arrays = gather_arrays(cache, padded_ids(turn.blocks), turn.slot)
    for a in arrays:
        a.copy_to_host_async()
    return DeviceTurn(turn.length, len(turn.blocks), tuple(arrays))


def to_host(cache: Cache, turn: L.Turn) -> HostTurn:
    """Copy a committed turn's blocks and state slot to host memory (the ledger is not changed)."""
    return gather(cache, turn).fetch()


def from_host(ledger: L.Ledger, cache: Cache, key, host: HostTurn):
    """Install a host turn as the committed turn of key in fresh blocks and a fresh slot.

    Returns (ledger, cache); raises OutOfBlocks/OutOfSlots with nothing changed.
    """
    rc, slots = ledger.refcount.copy(), ledger.slots.copy()
    n = host.k.shape[1]
    blocks = L.alloc_blocks(rc, n)
    slot = L.alloc_slot(slots)
    slots[slot] = L.SLOT_COMMITTED
    idx = padded_ids(blocks)
    pad = idx.shape[0] - n
    # Padding rows write zeros into the scratch block, which holds nothing of value.
    k = np.pad(host.k, [(0, 0), (0, pad)] + [(0, 0)] * 3)
    v = np.pad(host.v, [(0, 0), (0, pad)] + [(0, 0)] * 3)
    cache = scatter_arrays(cache, idx, slot, k, v, host.conv, host.ssm)
    turns = dict(ledger.turns)
    turns[key] = L.Turn(host.length, tuple(blocks), slot, ledger.clock + 1)
    return ledger.replace(refcount=rc, slots=slots, turns=turns, clock=ledger.clock + 1), cache
