"""Mamba2 SSD chunked scan as a Pallas (Triton) kernel. Same signature and semantics as `reference.ssd_scan`.

Grid: (batch, head, head-dim block). One kernel instance owns the state slice [block_p, N] of one (batch, head)
and walks the chunks in order (`fori_loop`), so both the within-chunk quadratic part and the inter-chunk
recurrence run inside the kernel, with the state kept in registers / on chip in float32:

  per chunk c (L = chunk_size rows):
    a = dt * A;  a_cum = cumsum(a);  a_tot = sum(a)
    y      = ((C @ B^T) * exp(a_cum[l] - a_cum[s]) [l >= s]) @ (x * dt)        within-chunk (quadratic) part
           + (C @ state^T) * exp(a_cum)[:, None]                               contribution of the entering state
    state  = state * exp(a_tot) + (x * dt * exp(a_tot - a_cum))^T @ B         recurrence to the chunk end
    (optionally) chunk_states[c] = state

B / C are read from group h // (H // G) directly (no per-head copy). C @ B^T is recomputed per head-dim block:
block_p defaults to the largest power of 2 <= 64 dividing P (16 for P = 80, i.e. 5 blocks per head), else P is
zero-padded to a multiple of 16. chunk_size and N must be powers of 2 (>= 16 on the GPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import default_interpret, dot_f32, pad_axis, pow2_divisor, round_up, triton_params


def _ssd_kernel(A_ref, x_ref, dt_ref, B_ref, C_ref, init_ref, y_ref, final_ref, *cs_refs, chunk_size: int,
                num_chunks: int):
    # A_ref [1]; x_ref [T, bp]; dt_ref [T]; B_ref/C_ref [T, N]; init_ref/final_ref [bp, N]; y_ref [T, bp];
    # cs_refs: () or ([num_chunks, bp, N],)
    L = chunk_size
    f32 = jnp.float32
    A = A_ref[0].astype(f32)
    causal = lax.broadcasted_iota(jnp.int32, (L, L), 0) >= lax.broadcasted_iota(jnp.int32, (L, L), 1)

    def body(c, state):
        rows = pl.ds(pl.multiple_of(c * L, L), L)
        x = x_ref[rows, :].astype(f32)    # [L, bp]
        dt = dt_ref[rows].astype(f32)     # [L]
        Bm = B_ref[rows, :].astype(f32)   # [L, N]
        Cm = C_ref[rows, :].astype(f32)   # [L, N]
        a = dt * A
        a_cum = jnp.cumsum(a)
        a_tot = jnp.sum(a)
        xdt = x * dt[:, None]
        decay = jnp.exp(jnp.where(causal, a_cum[:, None] - a_cum[None, :], -jnp.inf))  # masked before exp
        scores = dot_f32(Cm, Bm, contract_a=1, contract_b=1) * decay                   # [L, L]
        y = dot_f32(scores, xdt) + dot_f32(Cm, state, contract_a=1, contract_b=1) * jnp.exp(a_cum)[:, None]
        y_ref[rows, :] = y.astype(y_ref.dtype)
        xw = xdt * jnp.exp(a_tot - a_cum)[:, None]                                      # [L, bp]
        new = state * jnp.exp(a_tot) + dot_f32(xw, Bm, contract_a=0, contract_b=0)    # [bp, N]
        if cs_refs:
            cs_refs[0][c] = new
        return new

    final_ref[...] = lax.fori_loop(0, num_chunks, body, init_ref[...].astype(f32))


def _pick_block_p(P: int, block_p: int | None) -> int:
    if block_p is not None:
        return block_p
    bp = pow2_divisor(P, 64)
    return bp if bp >= 16 or bp == P else 16


@functools.partial(jax.jit, static_argnames=("chunk_size", "return_chunk_states", "block_p", "num_warps",
                                             "num_stages", "interpret"))
def _ssd_scan(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, init_BHPN, *, chunk_size, return_chunk_states, block_p,
              num_warps, num_stages, interpret):
    Bsz, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[2:]
    L = chunk_size
    if T % L:
        raise ValueError(f"T={T} must be a multiple of chunk_size={L}")
    if H % G:
        raise ValueError(f"heads {H} must be a multiple of groups {G}")
    hpg = H // G
    nc = T // L
    bp = _pick_block_p(P, block_p)
    P_pad = round_up(P, bp)
    x = pad_axis(x_BTHP, 3, P_pad)
    init = pad_axis(init_BHPN, 2, P_pad)
    f32 = jnp.float32

    in_specs = [
        pl.BlockSpec((1,), lambda b, h, p: (h,)),                                   # A
        pl.BlockSpec((None, T, None, bp), lambda b, h, p: (b, 0, h, p)),            # x
        pl.BlockSpec((None, T, None), lambda b, h, p: (b, 0, h)),                   # dt
        pl.BlockSpec((None, T, None, N), lambda b, h, p: (b, 0, h // hpg, 0)),      # B (group of head h)
        pl.BlockSpec((None, T, None, N), lambda b, h, p: (b, 0, h // hpg, 0)),      # C
        pl.BlockSpec((None, None, bp, N), lambda b, h, p: (b, h, p, 0)),            # initial state
    ]
    out_specs = [
        pl.BlockSpec((None, T, None, bp), lambda b, h, p: (b, 0, h, p)),            # y
        pl.BlockSpec((None, None, bp, N), lambda b, h, p: (b, h, p, 0)),            # final state
    ]
    out_shape = [jax.ShapeDtypeStruct((Bsz, T, H, P_pad), f32), jax.ShapeDtypeStruct((Bsz, H, P_pad, N), f32)]
    if return_chunk_states:
        out_specs.append(pl.BlockSpec((None, nc, None, bp, N), lambda b, h, p: (b, 0, h, p, 0)))
        out_shape.append(jax.ShapeDtypeStruct((Bsz, nc, H, P_pad, N), f32))

    outs = pl.pallas_call(
        functools.partial(_ssd_kernel, chunk_size=L, num_chunks=nc),
        grid=(Bsz, H, P_pad // bp),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ssd_scan",
    )(A_H, x, dt_BTH, B_BTGN, C_BTGN, init)
    if P_pad != P:
        outs = [outs[0][..., :P], outs[1][:, :, :P]] + ([outs[2][:, :, :, :P]] if return_chunk_states else [])
    return tuple(outs)


def ssd_scan(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, init_BHPN, *, chunk_size: int, return_chunk_states: bool = False,
             block_p: int | None = None, num_warps: int = 8, num_stages: int = 2, interpret: bool | None = False):
    """Mamba2 SSD chunked scan with an initial state (see `reference.ssd_scan`).

    Returns y [B,T,H,P] f32, final state [B,H,P,N] f32 and, if asked, the chunk-end states [B,T//L,H,P,N].
    interpret=None picks interpret mode when the default backend is CPU.
    """
    if interpret is None:
        interpret = default_interpret()
    return _ssd_scan(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, init_BHPN, chunk_size=int(chunk_size),
                     return_chunk_states=bool(return_chunk_states), block_p=block_p, num_warps=num_warps,
                     num_stages=num_stages, interpret=bool(interpret))
