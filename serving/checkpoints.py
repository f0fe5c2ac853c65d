"""Token-addressed checkpoints: the index over committed states, by cache salt and token ids.

A checkpoint is the exact state (KV blocks by reference, one Mamba slot) after a sequence of token ids. Under a
salt (None is a root of its own) the checkpoints form a tree over token ids: a request attaches the deepest one
whose tokens are a prefix of its own, whatever the client sent (an id or none, the suffix or the whole history,
a regenerate, an edit, a fork). The index finds it by hashing the prompt's prefixes once, incrementally, at the
lengths that checkpoints exist at, and then compares the tokens themselves (the digest is the fast path, never
the proof).

Each checkpoint remembers the conversation that committed it (its owner, None when anonymous) and whether it is a
conversation's head (the state after its last committed turn). Eviction takes least recently used checkpoints,
anonymous and intermediate ones before heads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time

import numpy as np


def digest(tokens_T: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(tokens_T, np.int32).tobytes(), digest_size=16).digest()


@dataclasses.dataclass
class Checkpoint:
    cid: int
    salt: str | None
    tokens: np.ndarray            # [length] int32: the ids the state was computed from
    digest: bytes
    owner: tuple | None           # (cache_salt, conversation_id) that committed it; None: anonymous
    boundary: bool = False        # taken at a message boundary inside a prompt (intermediate)
    on_host: bool = False         # evicted to the host tier (its device blocks and slot are gone)
    on_disk: bool = False         # a copy is stored (or queued) in the disk tier (serving/disk_tier.py)
    last_used: float = dataclasses.field(default_factory=time.time)  # wall clock, for the time-to-live

    @property
    def length(self) -> int:
        return len(self.tokens)


class CheckpointIndex:
    def __init__(self):
        self._ids = itertools.count(1)
        self.meta: dict[int, Checkpoint] = {}
        self._by_salt: dict[str | None, dict[int, dict[bytes, int]]] = {}  # salt -> length -> digest -> cid
        self.heads: dict[tuple, int] = {}                                  # conversation key -> cid
        self._head_cids: dict[int, int] = {}                               # cid -> heads naming it

    def new_id(self) -> int:
        return next(self._ids)

    def add(self, ck: Checkpoint) -> None:
        """Register ck; an identical checkpoint (same salt and tokens) it replaces is returned by `duplicate`."""
        self.meta[ck.cid] = ck
        self._by_salt.setdefault(ck.salt, {}).setdefault(ck.length, {})[ck.digest] = ck.cid

    def duplicate(self, salt, tokens_T: np.ndarray) -> int | None:
        """The checkpoint already holding exactly these tokens under salt, if any."""
        cid = self._by_salt.get(salt, {}).get(len(tokens_T), {}).get(digest(tokens_T))
        return cid if cid is not None and np.array_equal(self.meta[cid].tokens, tokens_T) else None

    def remove(self, cid: int) -> Checkpoint:
        ck = self.meta.pop(cid)
        by_len = self._by_salt[ck.salt]
        by_len[ck.length].pop(ck.digest, None)
        if not by_len[ck.length]:
            del by_len[ck.length]
        if not by_len:
            del self._by_salt[ck.salt]
        for key in [k for k, c in self.heads.items() if c == cid]:
            self.drop_head(key)
        return ck

    def set_head(self, key, cid: int) -> None:
        self.drop_head(key)
        self.heads[key] = cid
        self._head_cids[cid] = self._head_cids.get(cid, 0) + 1

    def drop_head(self, key) -> None:
        cid = self.heads.pop(key, None)
        if cid is not None:
            self._head_cids[cid] -= 1
            if not self._head_cids[cid]:
                del self._head_cids[cid]

    def lookup(self, salt, prompt_T: np.ndarray, limit: int) -> int | None:
        """The deepest checkpoint under salt whose tokens are a prefix of prompt_T, shorter than limit."""
        by_len = self._by_salt.get(salt)
        if not by_len:
            return None
        lengths = sorted(n for n in by_len if n < limit and n <= len(prompt_T))
        buf = np.ascontiguousarray(prompt_T, np.int32).tobytes()
        h, at, found = hashlib.blake2b(digest_size=16), 0, []
        for n in lengths:
            h.update(buf[4 * at:4 * n])
            at = n
            cid = by_len[n].get(h.copy().digest())
            if cid is not None:
                found.append(cid)
        for cid in reversed(found):  # deepest first; the tokens themselves decide
            if np.array_equal(self.meta[cid].tokens, prompt_T[:self.meta[cid].length]):
                return cid
        return None

    def has_salt(self, salt) -> bool:
        return salt in self._by_salt

    def idle_since(self, t: float) -> list[int]:
        """Checkpoints not used since wall time t."""
        return [cid for cid, ck in self.meta.items() if ck.last_used < t]

    def owned_by(self, key) -> list[int]:
        return [cid for cid, ck in self.meta.items() if ck.owner == key]

    def eviction_rank(self, cid: int, last_used: int) -> tuple:
        """Sort key for eviction: anonymous and intermediate checkpoints before heads, then least recent."""
        return (cid in self._head_cids, last_used)
