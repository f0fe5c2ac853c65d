"""Helpers shared by the Pallas kernels (Triton-lowered GPU kernels, also runnable with `interpret=True` on CPU).

Constraints of the Pallas Triton lowering that every kernel here respects:
  * every loaded / stored / computed array has a power-of-2 number of elements;
  * `jnp.dot` operands are 2-D (and, for the tensor cores, every dim >= 16);
  * blocks are never partially out of bounds (the Triton lowering does not mask edge blocks), so the wrappers
    pad to a multiple of the block or pick a block that divides the dimension.
In jax >= 0.10 a `pallas_call` without compiler params lowers to *Mosaic GPU*, not Triton, so every call here
passes the Triton `CompilerParams` explicitly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ops import platform

try:  # the Triton compiler params moved / were renamed across jax versions
    from jax.experimental.pallas import triton as _pltriton
except Exception:  # pragma: no cover - very old / stripped jax
    _pltriton = None

_TRITON_PARAMS_CLS = (getattr(_pltriton, "CompilerParams", None)
                      or getattr(_pltriton, "TritonCompilerParams", None))

# f32 dots inside the kernels: HIGHEST lowers to Triton's IEEE input precision (exact f32, matches the references).
# DEFAULT would lower to TF32 on the tensor cores (faster, ~1e-3 relative error): a tuning knob for later.
F32_DOT_PRECISION = lax.Precision.HIGHEST


def triton_params(num_warps: int = 4, num_stages: int = 2):
    """Triton compiler params for `pl.pallas_call` (forces the Triton backend on GPU; ignored in interpret mode)."""
    if _TRITON_PARAMS_CLS is not None:
        return _TRITON_PARAMS_CLS(num_warps=num_warps, num_stages=num_stages)
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))  # pragma: no cover - jax < 0.4.31


def default_interpret() -> bool:
    """Interpret mode is the only way to run a Pallas GPU kernel on a CPU backend (the platform of
    `ops.lowering_for` when one is named)."""
    return platform() == "cpu"


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of 2 that divides n and is <= cap."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad `x` along `axis` at the end up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def dot_f32(a: jax.Array, b: jax.Array, *, contract_a: int = 1, contract_b: int = 0) -> jax.Array:
    """2-D matmul with f32 accumulation, contracting dim `contract_a` of a with dim `contract_b` of b.

    (contract_a=1, contract_b=1) is a @ b.T and (0, 0) is a.T @ b; the Triton lowering turns those into transposes.
    """
    precision = F32_DOT_PRECISION if (a.dtype == jnp.float32 and b.dtype == jnp.float32) else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)
