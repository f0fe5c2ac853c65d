"""The values of a planned tensor (hybrid_jax/checkpoint_writer/plan.py): generated in float32 chunks with numpy,
each tensor's depending only on (seed, tensor name), and encoded in the storage dtype."""
from __future__ import annotations

import hashlib
import math

import numpy as np

from hybrid_jax.checkpoint_writer.plan import TensorSpec
from hybrid_jax.weights_file import STORAGE_DTYPES

_CHUNK_ELEMS = 1 << 22  # values generated per numpy call (16 MiB of float32)


def _rng(seed: int, name: str) -> np.random.Generator:
    """Generator for one tensor: depends only on (seed, name). SFC64 is the fastest numpy bit generator."""
    digest = hashlib.sha256(name.encode()).digest()
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest[:8], "little")])
    return np.random.Generator(np.random.SFC64(ss))


def encode(x: np.ndarray, dtype: str) -> bytes:
    """float32 values -> their bytes in the storage dtype (a STORAGE_DTYPES name; bfloat16 rounded to nearest
    even, as torch rounds)."""
    return np.asarray(x, np.float32).astype(STORAGE_DTYPES[dtype], copy=False).tobytes()


def _dt_values(n: int, rng: np.random.Generator, config: dict) -> np.ndarray:
    lo = float(config.get("time_step_min", config.get("mamba_dt_min", 0.001)))
    hi = float(config.get("time_step_max", config.get("mamba_dt_max", 0.1)))
    floor = float(config.get("time_step_floor", config.get("mamba_dt_init_floor", 1e-4)))
    u = rng.random(n)
    dt = np.exp(u * (math.log(hi) - math.log(lo)) + math.log(lo))
    dt = np.maximum(dt, floor)
    return (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # inverse softplus


def chunks(spec: TensorSpec, seed: int, init_std: float, config: dict):
    """Yield float32 chunks (flattened, C order) of the tensor's values."""
    n = spec.numel
    if spec.init == "ones":
        yield np.ones(n, np.float32)
    elif spec.init == "zeros":
        yield np.zeros(n, np.float32)
    elif spec.init == "a_log":
        yield np.log(np.arange(1, n + 1, dtype=np.float64)).astype(np.float32)
    elif spec.init == "dt_bias":
        yield _dt_values(n, _rng(seed, spec.name), config)
    elif spec.init == "normal":
        std = np.float32(init_std if spec.std is None else spec.std)
        rng = _rng(seed, spec.name)
        done = 0
        while done < n:
            m = min(_CHUNK_ELEMS, n - done)
            chunk = rng.standard_normal(m, dtype=np.float32)
            chunk *= std
            yield chunk
            done += m
    else:
        raise ValueError(f"unknown init {spec.init!r}")


def tensor_values(spec: TensorSpec, seed: int = 0, init_std: float = 0.02, config: dict | None = None) -> np.ndarray:
    """The float32 values (before the cast to the storage dtype) that the writer stores for ``spec``."""
    flat = np.concatenate(list(chunks(spec, seed, init_std, config or {})))
    return flat.reshape(spec.shape)
