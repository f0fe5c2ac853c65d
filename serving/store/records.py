"""What the state store returns, and the encodings of what it stores (one place for each)."""
from __future__ import annotations

import dataclasses
import json
import sys
from array import array


@dataclasses.dataclass(frozen=True)
class ConversationRecord:
    """A conversation's committed head: its latest settled turn."""
    salt: str | None
    cid: str
    turns: int                  # settled turns so far
    messages: list[dict]        # as rendered into `ids`
    seen: list[dict] | None     # the same messages as the client received them (None: not recorded)
    ids: list[int]              # the committed token ids
    digest: str | None          # the head checkpoint's digest, hex
    last_used: float


@dataclasses.dataclass(frozen=True)
class Tombstone:
    """A conversation forgotten by TTL or capacity: its id stays taken until it is deleted."""
    reason: str                 # 'expired' | 'evicted'
    when: float
    turns: int                  # how many turns it had


@dataclasses.dataclass(frozen=True)
class ConversationSummary:
    salt: str | None
    cid: str
    turns: int
    last_used: float
    tombstone: str | None       # the reason, for a tombstone


@dataclasses.dataclass(frozen=True)
class TurnRecord:
    """One settled turn of a conversation's history, whole."""
    turn: int                   # 1 for the first
    messages: list[dict]
    seen: list[dict] | None
    ids: list[int]
    digest: str | None
    owner: str | None           # who committed it (the replica's lease owner), if given
    committed: float


@dataclasses.dataclass(frozen=True)
class StoredResponseRecord:
    id: str
    salt: str | None
    record: dict
    created: float
    last_used: float


TOMBSTONE_REASONS = ("expired", "evicted")


# ---------------------------------------------------------------------------------------------- encodings
def salt_key(salt: str | None) -> str:
    """The stored form of a cache salt: '' for None (no salt; a real salt is never empty)."""
    if salt == "":
        raise ValueError("a cache salt is None or a non-empty string")
    return "" if salt is None else salt


def salt_of(key: str) -> str | None:
    return None if key == "" else key


def pack_ids(ids) -> bytes:
    """Token ids as int32 little-endian bytes (4 bytes an id: 100K ids are 400 KB)."""
    arr = array("i", ids)
    if arr.itemsize != 4:  # pragma: no cover - every platform Python supports has a 4-byte C int
        raise RuntimeError("array('i') is not 32-bit here")
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def unpack_ids(blob: bytes | memoryview | None) -> list[int]:
    if not blob:
        return []
    arr = array("i")
    arr.frombytes(bytes(blob))
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tolist()


def dump_json(value) -> str:
    """Compact JSON, UTF-8 where it can be; a string with a lone surrogate (which no database accepts as text)
    falls back to \\u escapes."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return text


def load_json(text: str | None):
    return None if text is None else json.loads(text)


def digest_hex(digest: bytes | str | None) -> str | None:
    if digest is None or isinstance(digest, str):
        return digest
    return bytes(digest).hex()


def common_prefix(a: list, b: list) -> int:
    """How many leading entries `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def common_prefix_bytes(a: bytes, b: bytes, unit: int = 4) -> int:
    """How many leading `unit`-byte items the byte strings `a` and `b` share (binary search over slices, so the
    comparisons run in C)."""
    n = min(len(a), len(b)) // unit
    if a[:n * unit] == b[:n * unit]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi] (in items)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid * unit] == b[:mid * unit]:
            lo = mid
        else:
            hi = mid
    return lo
