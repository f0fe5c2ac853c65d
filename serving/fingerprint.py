"""What produced a saved cache state: the model config, a digest of the weight files, the dtype, the block size,
the cache mode, the tokenizer files and the chat template. Saved state is restored only into an engine with the
same fingerprint; anything else starts empty and the log says which part differs.

Hashing the weight files reads them once; the digest of each file is remembered next to the state (by path,
size and modification time), so a restart with unchanged weights does not read them again.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os

import jax
import numpy as np

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "byte_tokenizer.json", "chat_template.jinja",
                    "special_tokens_map.json")
_CHUNK = 1 << 24


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: str, memo: dict) -> str:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def _weights(engine, memo: dict) -> str:
    model_dir = getattr(engine, "model_dir", None)
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))) if model_dir else []
    if files:
        return _sha("".join(os.path.basename(f) + _file_digest(f, memo) for f in files).encode())
    h = hashlib.sha256()  # an engine built from in-memory params: hash the params themselves
    for leaf in jax.tree.leaves(engine.params):
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def _tokenizer(engine) -> str:
    model_dir = getattr(engine, "model_dir", None) or ""
    h = hashlib.sha256(str(getattr(engine.tokenizer, "chat_template", "")).encode())
    for name in _TOKENIZER_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def fingerprint(engine, memo_path: str | None = None) -> dict:
    """The fingerprint of `engine` (memo_path: a JSON file that remembers weight-file digests)."""
    memo = {}
    if memo_path and os.path.isfile(memo_path):
        try:
            with open(memo_path) as f:
                memo = json.load(f)
        except (OSError, ValueError):
            memo = {}
    fp = {"config": _sha(json.dumps(dataclasses.asdict(engine.cfg), sort_keys=True, default=str).encode()),
          "weights": _weights(engine, memo), "dtype": str(engine.params["embed"].dtype),
          "block_size": engine.block_size, "cache_mode": engine.cache_mode, "tokenizer": _tokenizer(engine)}
    if memo_path:
        fd = os.open(memo_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(memo_path + ".tmp", memo_path)
    return fp


def differences(saved: dict | None, current: dict) -> list[str]:
    """The parts of the fingerprint that differ (all of them when nothing was saved)."""
    if not isinstance(saved, dict):
        return sorted(current)
    return [k for k in sorted(current) if saved.get(k) != current[k]]
