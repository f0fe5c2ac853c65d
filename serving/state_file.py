"""One stored state as a file: the disk tier's format (serving/disk_tier.py).

A file is named `<fp>-<address>.state`: <fp> begins the engine's fingerprint (a SHA-256 of serving/fingerprint.py's
dict), <address> hashes the whole fingerprint, the salt and the token digest, so a file is content-addressed and
another salt never finds another tenant's state. Inside: MAGIC, the header's length (u32, little-endian), the
header (JSON: format, fingerprint, salt, length, token digest, owner, arrays as [name, dtype, shape], the CRC-32
of everything after the header), the token ids (int32) and the arrays k, v, conv, ssm (C order, little-endian).

A file is loaded only if all of it checks out: its name is its content's address, the magic, format, byte order
and fingerprint are this engine's, the token ids match their digest (and the ids asked for), the arrays have the
shapes and dtypes of this engine's cache (so copying them in compiles nothing new), the size is exact and the
checksum matches. Anything else raises `Rejected`. Writes are atomic: a `.tmp` file, fsync, rename, fsync of
the directory. Functions here are pure file work, safe on any thread.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import sys
import time
import zlib

import numpy as np

from hybrid_jax.ledger import blocks_for
from hybrid_jax.offload import HostTurn
from serving.checkpoints import digest

MAGIC = b"HYBSTATE"
FORMAT = 1
ARRAYS = ("k", "v", "conv", "ssm")
_MAX_HEADER = 1 << 20
_CHUNK = 1 << 26
_READ = 1 << 22


class Rejected(Exception):
    """A file that is not a whole, matching state of this engine."""


@dataclasses.dataclass
class DiskEntry:
    """A stored state: what the checkpoint index needs to find it (salt, token ids, owner), and its file."""
    name: str
    salt: str | None
    tokens: np.ndarray
    owner: tuple | None
    boundary: bool
    nbytes: int = 0
    mtime: float = dataclasses.field(default_factory=time.time)


def state_name(fingerprint: str, salt, token_digest: bytes) -> str:
    """The file name of the state after the tokens of `token_digest` under `salt` for an engine `fingerprint`."""
    h = hashlib.blake2b(fingerprint.encode() + b"\0" + json.dumps(salt).encode() + b"\0" + token_digest,
                        digest_size=16)
    return f"{fingerprint[:16]}-{h.hexdigest()}.state"


def layout_of(cache) -> dict:
    """name -> (dtype, shape) of a state's arrays in `cache`; -1 stands for the number of KV blocks."""
    k, v, conv, ssm = cache.kv.k, cache.kv.v, cache.mamba.conv, cache.mamba.ssm
    return {"k": (np.dtype(k.dtype), (k.shape[0], -1, *k.shape[2:])),
            "v": (np.dtype(v.dtype), (v.shape[0], -1, *v.shape[2:])),
            "conv": (np.dtype(conv.dtype), (conv.shape[0], *conv.shape[2:])),
            "ssm": (np.dtype(ssm.dtype), (ssm.shape[0], *ssm.shape[2:]))}


@dataclasses.dataclass(frozen=True)
class StateFormat:
    """The files of one engine: its fingerprint (hex), its cache's layout (layout_of), block size and the most
    blocks a sequence can have."""
    fp: str
    layout: dict
    block_size: int
    max_blocks: int

    def name(self, salt, token_digest: bytes) -> str:
        return state_name(self.fp, salt, token_digest)

    def write(self, directory: str, entry: DiskEntry, turn: HostTurn) -> int:
        """Write `turn` as entry.name in directory, atomically; returns the file's size."""
        tokens = np.ascontiguousarray(entry.tokens, "<i4")
        body = [memoryview(tokens.view(np.uint8))] + [_bytes(getattr(turn, a)) for a in ARRAYS]
        header = json.dumps({
            "format": FORMAT, "fingerprint": self.fp, "salt": entry.salt, "length": len(tokens),
            "digest": digest(tokens).hex(), "owner": None if entry.owner is None else list(entry.owner),
            "boundary": entry.boundary, "byteorder": sys.byteorder, "crc32": _crc(body),
            "arrays": [[a, str(getattr(turn, a).dtype), list(getattr(turn, a).shape)] for a in ARRAYS]}).encode()
        tmp = os.path.join(directory, f".{entry.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                for m in body:
                    f.write(m)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(directory, entry.name))
        except BaseException:
            remove(tmp)
            raise
        fsync_dir(directory)
        return len(MAGIC) + 4 + len(header) + sum(m.nbytes for m in body)

    def header(self, f, name: str) -> tuple[dict, np.ndarray, int]:
        """Read and check a file's header and token ids; returns (header, tokens, the file's expected size)."""
        head = f.read(len(MAGIC) + 4)
        if len(head) != len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
            raise Rejected("not a state file")
        (n,) = struct.unpack("<I", head[len(MAGIC):])
        if n > _MAX_HEADER:
            raise Rejected("header too large")
        h = json.loads(f.read(n))
        if not isinstance(h, dict) or h.get("format") != FORMAT or h.get("byteorder") != sys.byteorder:
            raise Rejected("another format")
        if h.get("fingerprint") != self.fp:
            raise Rejected("another model setup (fingerprint)")
        if not (h.get("salt") is None or isinstance(h.get("salt"), str)):
            raise Rejected("bad salt")
        length = h.get("length")
        if not isinstance(length, int) or length <= 0 or blocks_for(length, self.block_size) > self.max_blocks:
            raise Rejected("bad length")
        tokens = np.frombuffer(f.read(4 * length), "<i4").astype(np.int32)
        if len(tokens) != length or digest(tokens).hex() != h.get("digest"):
            raise Rejected("token ids differ from their digest")
        if name != self.name(h["salt"], digest(tokens)):
            raise Rejected("name is not this state's address")
        nb = blocks_for(length, self.block_size)
        want = [[a, str(self.layout[a][0]), [nb if d == -1 else d for d in self.layout[a][1]]] for a in ARRAYS]
        if h.get("arrays") != want:
            raise Rejected("array shapes or dtypes differ from this engine's cache")
        size = len(MAGIC) + 4 + n + 4 * length + sum(
            int(np.prod(shape)) * self.layout[a][0].itemsize for a, _, shape in want)
        return h, tokens, size

    def load(self, path: str, salt, tokens: np.ndarray) -> HostTurn:
        """Read a whole state file and check everything, the salt and token ids asked for included (raises
        Rejected, or OSError)."""
        with open(path, "rb") as f:
            h, got, size = self.header(f, os.path.basename(path))
            if h["salt"] != salt or not np.array_equal(got, tokens):
                raise Rejected("another salt or other token ids")
            if os.fstat(f.fileno()).st_size != size:
                raise Rejected("torn: the file has the wrong size")
            buf, crc = _read_checked(f, size - f.tell(), _crc([memoryview(got.astype("<i4").view(np.uint8))]))
        if crc != h["crc32"]:
            raise Rejected("checksum mismatch")
        arrays, at = {}, 0
        for a, _, shape in h["arrays"]:
            dt = self.layout[a][0]
            count = int(np.prod(shape))
            arrays[a] = np.frombuffer(buf, dt, count, at).reshape(shape)
            at += count * dt.itemsize
        return HostTurn(len(got), arrays["k"], arrays["v"], arrays["conv"], arrays["ssm"])


def _read_checked(f, n: int, crc: int) -> tuple[np.ndarray, int]:
    """Read n bytes and their running CRC-32, a few MiB at a time (checked while still in the CPU's cache)."""
    buf = np.empty(n, np.uint8)
    view, at = memoryview(buf), 0
    while at < n:
        got = f.readinto(view[at:at + _READ])
        if not got:
            raise Rejected("torn: short read")
        crc = zlib.crc32(view[at:at + got], crc)
        at += got
    return buf, crc


def _crc(chunks, c: int = 0) -> int:
    for m in chunks:
        for i in range(0, len(m), _CHUNK):
            c = zlib.crc32(m[i:i + _CHUNK], c)
    return c


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
