"""`--dtype auto` on a CPU: compute in float32 when the checkpoint stores half precision and it fits.

XLA's CPU backend computes bfloat16 and float16 matmuls many times slower than float32, and converting the
weights inside a step costs as much (`python -m bench.bench_cpu_dtype` on a 2-core machine: a [1, 2048] x
[2048, 8192] product takes 31 ms in bfloat16, 32 ms converting bfloat16 weights, 2.3 ms in float32; 57, 47 and
19 ms for 64 rows; docs/benchmarks/loading_and_dtype_cpu.md). So on a CPU, "auto" loads a bfloat16 or float16
checkpoint as float32 when twice its weights fit in the memory available (with room to spare), and keeps its
dtype otherwise; the log says which and why. An explicit --dtype is always obeyed; accelerators keep "auto".
"""
from __future__ import annotations

import logging

from hybrid_jax.weights_file import checkpoint_bytes

log = logging.getLogger("serving")
HALF = ("bfloat16", "float16")
HEADROOM = 0.7  # float32 weights may take at most this share of the memory available


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve(dtype: str, stored: str, backend: str, weight_bytes: int, available: int | None) -> tuple[str, str]:
    """(the dtype to load, why) for the --dtype flag `dtype` of a checkpoint storing `stored` on `backend`."""
    if str(dtype).lower() != "auto" or backend != "cpu" or stored not in HALF:
        return dtype, ""
    need = 2 * weight_bytes
    if available is not None and need > HEADROOM * available:
        return dtype, (f"--dtype auto keeps the checkpoint's {stored} on the CPU: float32 weights ({need >> 20} MiB) "
                       f"would not fit in the {available >> 20} MiB available; its matmuls run several times "
                       "slower than float32 here")
    return "float32", (f"--dtype auto computes in float32 on the CPU (the checkpoint stores {stored}, whose matmuls "
                       "run several times slower on XLA's CPU backend); --dtype "
                       f"{stored} keeps half the memory")


def for_checkpoint(model_dir: str, dtype: str, stored: str) -> str:
    """`resolve` for this machine's default jax backend and memory; logs the choice when it is not plain."""
    import jax

    if str(dtype).lower() != "auto" or stored not in HALF:
        return dtype
    chosen, why = resolve(dtype, stored, jax.default_backend(), checkpoint_bytes(model_dir), available_memory())
    if why:
        log.info(why)
    return chosen
