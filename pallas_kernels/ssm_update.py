"""One-token Mamba2 state update (decode) as a Pallas (Triton) kernel. Same semantics as
`reference.ssm_decode_step`.

Grid: (batch slot, head, head-dim block). Each instance loads its state tile [block_p, N], applies
new = state * exp(dt * A) + (dt * x)[:, None] * B[None, :] and y = new @ C, and writes both back. It is purely
memory bound (the state is read and written once); when the state is float32 it is aliased to the new-state output
so a caller that donates the state gets an in-place update.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import default_interpret, pad_axis, pow2_divisor, round_up, triton_params


def _ssm_update_kernel(dt_ref, A_ref, x_ref, B_ref, C_ref, state_ref, y_ref, new_ref):
    # dt_ref/A_ref [1]; x_ref [bp]; B_ref/C_ref [N]; state_ref/new_ref [bp, N]; y_ref [bp]
    f32 = jnp.float32
    dt = dt_ref[0].astype(f32)
    dA = jnp.exp(dt * A_ref[0].astype(f32))
    x = x_ref[...].astype(f32)
    Bv = B_ref[...].astype(f32)
    Cv = C_ref[...].astype(f32)
    new = state_ref[...].astype(f32) * dA + (dt * x)[:, None] * Bv[None, :]
    new_ref[...] = new
    y_ref[...] = jnp.sum(new * Cv[None, :], axis=1)


@functools.partial(jax.jit, static_argnames=("block_p", "num_warps", "num_stages", "interpret"))
def _ssm_decode_step(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, *, block_p, num_warps, num_stages, interpret):
    Bsz, H, P, N = state_BHPN.shape
    G = B_BGN.shape[1]
    hpg = H // G
    if block_p is None:
        block_p = pow2_divisor(P, 64)
        if block_p < 16 and block_p != P:
            block_p = 16
    bp = block_p
    P_pad = round_up(P, bp)
    state = pad_axis(state_BHPN, 2, P_pad)
    x = pad_axis(x_BHP, 2, P_pad)
    f32 = jnp.float32
    y, new = pl.pallas_call(
        _ssm_update_kernel,
        grid=(Bsz, H, P_pad // bp),
        in_specs=[
            pl.BlockSpec((None, 1), lambda b, h, p: (b, h)),                  # dt
            pl.BlockSpec((1,), lambda b, h, p: (h,)),                         # A
            pl.BlockSpec((None, None, bp), lambda b, h, p: (b, h, p)),        # x
            pl.BlockSpec((None, None, N), lambda b, h, p: (b, h // hpg, 0)),  # B (group of head h)
            pl.BlockSpec((None, None, N), lambda b, h, p: (b, h // hpg, 0)),  # C
            pl.BlockSpec((None, None, bp, N), lambda b, h, p: (b, h, p, 0)),  # state
        ],
        out_specs=[
            pl.BlockSpec((None, None, bp), lambda b, h, p: (b, h, p)),
            pl.BlockSpec((None, None, bp, N), lambda b, h, p: (b, h, p, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((Bsz, H, P_pad), f32), jax.ShapeDtypeStruct((Bsz, H, P_pad, N), f32)],
        input_output_aliases={5: 1} if state.dtype == f32 else {},
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ssm_decode_step",
    )(dt_BH, A_H, x, B_BGN, C_BGN, state)
    if P_pad != P:
        y, new = y[..., :P], new[:, :, :P]
    return y, new


def ssm_decode_step(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, *, block_p: int | None = None,
                    num_warps: int = 4, num_stages: int = 1, interpret: bool | None = False):
    """One-token Mamba2 state update. Returns y [B,H,P] f32 (no D skip) and the new state [B,H,P,N] f32.

    interpret=None picks interpret mode when the default backend is CPU.
    """
    if interpret is None:
        interpret = default_interpret()
    return _ssm_decode_step(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, block_p=block_p, num_warps=num_warps,
                            num_stages=num_stages, interpret=bool(interpret))
