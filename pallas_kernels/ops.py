"""Dispatch: the jnp reference on CPU (and as the fallback); Pallas kernels where they win by measurement.

`HYBRID_KERNELS=reference|pallas|auto` overrides the choice (default auto):
  reference  always the plain-jnp references (`pallas_kernels.reference`);
  pallas     always the Pallas kernels; on a non-GPU backend they run in Pallas interpret mode (slow, but lets
             `HYBRID_KERNELS=pallas` drive end-to-end checks on CPU);
  auto       the reference on CPU (and any non-GPU backend); on GPU the Pallas kernel only for the ops listed in
             `MEASURED_FASTER_ON_GPU`, the reference for the rest.

The choice is plain Python, made when an op is called, i.e. at trace time under `jit`: it costs nothing at run
time, and a function that was already traced keeps the choice it was traced with (set the env var before tracing).

"The backend" is `jax.default_backend()`, unless `lowering_for(platform)` names the platform a program is being
lowered for (`jax.export.export(..., platforms=(platform,))` on a machine without it): inside it the choice, and
whether a kernel runs in interpret mode, are those of that platform, so the Triton kernels are lowered for real
(tests/test_cross_lowering.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import jax

from pallas_kernels import reference

OP_NAMES = ("ssd_scan", "ssm_decode_step", "causal_conv1d", "causal_conv1d_step", "paged_prefill_attention",
            "paged_decode_attention")

# Ops whose Pallas kernel has been measured faster than the reference on a GPU with `bench/bench_kernels.py`
# (see docs/kernels.md). EMPTY ON PURPOSE: no kernel has been timed on a GPU yet (none was available when they were
# written), so `auto` keeps the references everywhere. Add an op name here only with a committed measurement.
MEASURED_FASTER_ON_GPU: frozenset[str] = frozenset()

_MODES = ("reference", "pallas", "auto")


def mode() -> str:
    """The requested mode, from `HYBRID_KERNELS` (default auto)."""
    m = os.environ.get("HYBRID_KERNELS", "auto").strip().lower() or "auto"
    if m not in _MODES:
        raise ValueError(f"HYBRID_KERNELS={m!r}: expected one of {_MODES}")
    return m


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("hybrid_kernels_target", default=None)


@contextlib.contextmanager
def lowering_for(platform: str):
    """Pick kernels (and interpret mode) for `platform` ("cuda", "rocm", "tpu", "cpu") instead of the default
    backend while tracing inside the block: for lowering a program for a platform that is not present."""
    token = _TARGET.set(platform.lower())
    try:
        yield
    finally:
        _TARGET.reset(token)


def platform() -> str:
    """The platform kernels are chosen for: the one `lowering_for` names, else `jax.default_backend()`."""
    return _TARGET.get() or jax.default_backend()


def _on_gpu() -> bool:
    return platform() in ("gpu", "cuda", "rocm")


def uses_pallas(op: str) -> bool:
    """Whether `op` dispatches to its Pallas kernel under the current mode and backend."""
    if op not in OP_NAMES:
        raise KeyError(op)
    m = mode()
    if m == "reference":
        return False
    if m == "pallas":
        return True
    return _on_gpu() and op in MEASURED_FASTER_ON_GPU


def kernel_choice() -> dict[str, str]:
    """{op: 'pallas' | 'pallas-interpret' | 'reference'} for logging / debugging."""
    return {op: ("reference" if not uses_pallas(op) else "pallas" if _on_gpu() else "pallas-interpret")
            for op in OP_NAMES}


def _kernel(op: str):
    from pallas_kernels import conv1d, paged_attention, ssd, ssm_update  # lazy: the references need no Pallas

    fn = {"ssd_scan": ssd.ssd_scan, "ssm_decode_step": ssm_update.ssm_decode_step,
          "causal_conv1d": conv1d.causal_conv1d, "causal_conv1d_step": conv1d.causal_conv1d_step,
          "paged_prefill_attention": paged_attention.paged_prefill_attention,
          "paged_decode_attention": paged_attention.paged_decode_attention}[op]
    return functools.partial(fn, interpret=not _on_gpu())


def _impl(op: str):
    return _kernel(op) if uses_pallas(op) else getattr(reference, op)


def ssd_scan(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, init_BHPN, *, chunk_size: int, return_chunk_states: bool = False):
    return _impl("ssd_scan")(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, init_BHPN, chunk_size=chunk_size,
                             return_chunk_states=return_chunk_states)


def ssm_decode_step(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN):
    return _impl("ssm_decode_step")(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN)


def causal_conv1d(x_BTC, state_BCW1, w_CW, b_C, lengths_B):
    return _impl("causal_conv1d")(x_BTC, state_BCW1, w_CW, b_C, lengths_B)


def causal_conv1d_step(x_BC, state_BCW1, w_CW, b_C):
    return _impl("causal_conv1d_step")(x_BC, state_BCW1, w_CW, b_C)


def paged_prefill_attention(q_BTHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, q_pos_BT, kv_len_B, *, scale: float):
    return _impl("paged_prefill_attention")(q_BTHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, q_pos_BT, kv_len_B,
                                            scale=scale)


def paged_decode_attention(q_BHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, kv_len_B, *, scale: float):
    return _impl("paged_decode_attention")(q_BHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, kv_len_B, scale=scale)


for _name in OP_NAMES:  # the references' docstrings state the semantics every implementation follows
    globals()[_name].__doc__ = getattr(reference, _name).__doc__
del _name
