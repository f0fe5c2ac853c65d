"""Streaming planned tensors into safetensors files: one tensor at a time, in chunks, so memory stays bounded by
the chunk size whatever the model size."""
from __future__ import annotations

import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from hybrid_jax.checkpoint_writer.plan import TensorSpec
from hybrid_jax.checkpoint_writer.values import chunks, encode
from hybrid_jax.weights_file import safetensors_tag


def shard_plan(specs: list[TensorSpec], dtype: str, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """specs in order, cut into shards of at most max_shard_bytes (a larger tensor alone in its shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nb = s.nbytes(dtype)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nb
    return shards


def write_safetensors(path: str, specs: list[TensorSpec], dtype: str, seed: int, init_std: float,
                      config: dict) -> None:
    """Write the safetensors file `path` holding specs' values (via `path`.partial, renamed when complete)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        nb = s.nbytes(dtype)
        header[s.name] = {"dtype": safetensors_tag(s.storage(dtype)), "shape": list(s.shape),
                          "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)  # data starts 8-byte aligned
    tmp = path + ".partial"
    # file writes release the GIL: a one-thread writer overlaps disk I/O with value generation
    with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=1) as io:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        pending: deque = deque()
        for s in specs:
            written = 0
            for chunk in chunks(s, seed, init_std, config):
                b = encode(chunk, s.storage(dtype))
                written += len(b)
                pending.append(io.submit(f.write, b))
                while len(pending) > 2:  # bounded memory: at most a few chunks in flight
                    pending.popleft().result()
            if written != s.nbytes(dtype):
                raise RuntimeError(f"internal error: wrote {written} bytes for {s.name}")
        while pending:
            pending.popleft().result()
    os.replace(tmp, path)
