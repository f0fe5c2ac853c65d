"""Tensors of a safetensors checkpoint (one file or a sharded index), each read by name with one positioned read
into an array of its own.

The file format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data offsets), then
the raw little-endian data. Reading it ourselves, rather than through a memory map, keeps the files' pages out of
the process's resident memory: loading a checkpoint holds one tensor on the host at a time besides what the
caller keeps, and bfloat16 comes back as ml_dtypes' bfloat16 (the dtype jax uses) on any safetensors version.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os

import ml_dtypes
import numpy as np

# safetensors dtype -> numpy dtype
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


#: The dtypes a checkpoint is written in (hybrid_jax/export.py, hybrid_jax/random_checkpoint.py): name -> numpy
#: dtype, and the other spellings of those names.
STORAGE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                 "half": "float16", "float": "float32"}


def storage_dtype(dtype) -> str:
    """The STORAGE_DTYPES name of dtype (a name or an alias, any case, "torch." prefix allowed); ValueError for
    any other."""
    d = str(dtype).lower().removeprefix("torch.")
    d = DTYPE_ALIASES.get(d, d)
    if d not in STORAGE_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use one of {', '.join(STORAGE_DTYPES)})")
    return d


def safetensors_tag(dtype: str) -> str:
    """The safetensors header dtype ("BF16", "F32", ...) of a STORAGE_DTYPES name."""
    want = np.dtype(STORAGE_DTYPES[dtype])
    return next(tag for tag, d in _ST_DTYPES.items() if np.dtype(d) == want)


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or holds weights that do not fit the config."""


def read_header(filename: str) -> tuple[dict, int]:
    """(the header without its __metadata__, the offset where the data begins) of one safetensors file."""
    with open(filename, "rb") as f:
        (n,) = np.frombuffer(f.read(8), "<u8")
        header = json.loads(f.read(int(n)))
    header.pop("__metadata__", None)
    return header, 8 + int(n)


def _read(filename: str, name: str, info: dict, start: int) -> np.ndarray:
    if info["dtype"] not in _ST_DTYPES:
        raise CheckpointError(f"weight {name!r} has dtype {info['dtype']}, which this loader cannot read")
    dt = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    begin, end = (int(x) for x in info["data_offsets"])
    count = int(np.prod(info["shape"], dtype=np.int64))
    if count * dt.itemsize != end - begin:
        raise CheckpointError(f"weight {name!r} in {filename!r}: {end - begin} bytes for shape {info['shape']}")
    a = np.fromfile(filename, dtype=dt, count=count, offset=start + begin)
    if a.size != count:
        raise CheckpointError(f"weight {name!r}: {filename!r} is truncated")
    return a.astype(dt.newbyteorder("="), copy=False).reshape(info["shape"])


def read_raw_tensor(filename: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file."""
    header, start = read_header(filename)
    if name not in header:
        raise CheckpointError(f"weight {name!r} is missing from {filename!r}")
    return _read(filename, name, header[name], start)


def checkpoint_bytes(path: str) -> int:
    """Bytes of the safetensors files of the checkpoint directory `path`."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


class Weights:
    """Name -> numpy array over the checkpoint in `path` (model.safetensors, or the shards its index names)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for fn in files:
            full = os.path.join(path, fn)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"checkpoint shard {full!r} named in the index is missing")
            try:
                header, start = read_header(full)
            except (ValueError, OSError) as e:
                raise CheckpointError(f"{full!r} is not a safetensors file ({e})") from None
            for k, info in header.items():
                self._where[k] = (full, info, start)

    def keys(self):
        return self._where.keys()

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"weight {name!r} is missing from the checkpoint")
        fn, info, start = self._where[name]
        return _read(fn, name, info, start)


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the operating system (glibc's malloc_trim; elsewhere nothing).
    Tensors read one at a time are freed between reads, but malloc keeps the pages, and their sum would count
    against a load's host memory."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
