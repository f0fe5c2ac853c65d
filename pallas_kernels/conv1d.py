"""Depthwise causal conv1d + SiLU (prefill over a span that continues a state, and one-token decode) as Pallas
(Triton) kernels. Same signatures and semantics as `reference.causal_conv1d` / `reference.causal_conv1d_step`.

Prefill grid: (batch, channel block, token block). Each instance computes a [block_t, block_c] output tile as
sum_k w[:, k] * x[t - (W-1-k)], reading the W shifted row windows of x straight from the input (row gathers with
clamped indices, no concatenated copy); rows that fall before the span start read the conv state instead. The
instance with token block 0 also writes the new state: the W-1 inputs ending at lengths[b] (state columns when
lengths[b] < W-1, exactly like the reference's dynamic slice of concat(state, x)).

Decode grid: (batch, channel block): y = silu(b + state . w[:, :W-1] + x * w[:, W-1]), new state = shift-left.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import default_interpret, next_pow2, pad_axis, pow2_divisor, round_up, triton_params


def _silu(v):
    return v * jax.nn.sigmoid(v)


def _pick_block_c(C: int, block_c: int) -> int:
    bc = pow2_divisor(C, block_c)
    return bc if bc >= 16 or bc == C else 16


def _split_refs(refs, has_bias: bool):
    """(bias or None, y, new state) from a kernel's trailing refs; the bias input exists only with a bias."""
    return tuple(refs) if has_bias else (None, *refs)


def _conv_kernel(len_ref, x_ref, state_ref, w_ref, *refs, width: int, seq_len: int, has_bias: bool):
    # len_ref [1] i32; x_ref [T_pad, bc] (the whole span); state_ref [bc, W-1]; w_ref [bc, W]; b_ref [bc];
    # y_ref [bt, bc]; ns_ref [bc, W-1]
    b_ref, y_ref, ns_ref = _split_refs(refs, has_bias)
    W = width
    f32 = jnp.float32
    block_t, block_c = y_ref.shape
    t_pad = x_ref.shape[0]
    ti = pl.program_id(2)
    rows = ti * block_t + lax.broadcasted_iota(jnp.int32, (block_t,), 0)
    state_cols = [state_ref[:, j].astype(x_ref.dtype).astype(f32) for j in range(W - 1)]
    acc = jnp.zeros((block_t, block_c), f32)
    if has_bias:
        acc = acc + b_ref[...].astype(f32)[None, :]
    for k in range(W):
        r = rows - (W - 1 - k)  # input row feeding tap k; r < 0 reads state column r + W - 1
        xs = x_ref[jnp.clip(r, 0, t_pad - 1), :].astype(f32)
        for j in range(k, W - 1):  # only rows 0 .. W-2-k of the first token block hit the state
            xs = jnp.where((r == j - (W - 1))[:, None], state_cols[j][None, :], xs)
        acc = acc + xs * w_ref[:, k].astype(f32)[None, :]
    y_ref[...] = _silu(acc).astype(y_ref.dtype)

    @pl.when(ti == 0)
    def _():
        n = jnp.clip(len_ref[0], 0, seq_len)
        for j in range(W - 1):  # new state column j = concat(state, x)[n + j]
            r = n + j - (W - 1)
            from_x = x_ref[jnp.maximum(r, 0), :].astype(ns_ref.dtype)
            from_state = state_ref[:, jnp.minimum(n + j, W - 2)].astype(ns_ref.dtype)
            ns_ref[:, j] = jnp.where(r >= 0, from_x, from_state)


@functools.partial(jax.jit, static_argnames=("block_t", "block_c", "num_warps", "num_stages", "interpret"))
def _causal_conv1d(x_BTC, state_BCW1, w_CW, b_C, lengths_B, *, block_t, block_c, num_warps, num_stages, interpret):
    Bsz, T, C = x_BTC.shape
    W = w_CW.shape[1]
    if W < 2:
        raise ValueError("conv width must be >= 2")
    bt = min(block_t, next_pow2(T))
    T_pad = round_up(T, bt)
    bc = _pick_block_c(C, block_c)
    C_pad = round_up(C, bc)
    x = pad_axis(pad_axis(x_BTC, 1, T_pad), 2, C_pad)
    state = pad_axis(state_BCW1, 1, C_pad)
    w = pad_axis(w_CW, 0, C_pad)
    has_bias = b_C is not None
    args = [lengths_B.astype(jnp.int32), x, state, w]
    in_specs = [
        pl.BlockSpec((1,), lambda b, c, t: (b,)),                     # lengths
        pl.BlockSpec((None, T_pad, bc), lambda b, c, t: (b, 0, c)),   # x: the whole span of the channel block
        pl.BlockSpec((None, bc, W - 1), lambda b, c, t: (b, c, 0)),   # state
        pl.BlockSpec((bc, W), lambda b, c, t: (c, 0)),                # weights
    ]
    if has_bias:
        args.append(pad_axis(b_C, 0, C_pad))
        in_specs.append(pl.BlockSpec((bc,), lambda b, c, t: (c,)))
    y, new_state = pl.pallas_call(
        functools.partial(_conv_kernel, width=W, seq_len=T, has_bias=has_bias),
        grid=(Bsz, C_pad // bc, T_pad // bt),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bt, bc), lambda b, c, t: (b, t, c)),
            pl.BlockSpec((None, bc, W - 1), lambda b, c, t: (b, c, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((Bsz, T_pad, C_pad), x_BTC.dtype),
                   jax.ShapeDtypeStruct((Bsz, C_pad, W - 1), x_BTC.dtype)],
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="causal_conv1d",
    )(*args)
    if T_pad != T or C_pad != C:
        y = y[:, :T, :C]
        new_state = new_state[:, :C]
    return y, new_state


def causal_conv1d(x_BTC, state_BCW1, w_CW, b_C, lengths_B, *, block_t: int = 64, block_c: int = 128,
                  num_warps: int = 4, num_stages: int = 2, interpret: bool | None = False):
    """Depthwise causal conv over a span that continues `state`, then SiLU (see `reference.causal_conv1d`).

    Returns y [B,T,C] and the state after the first lengths_B[b] inputs of the span [B,C,W-1].
    T not a multiple of block_t (or C of a power-of-2 channel block) costs a padded copy of x.
    interpret=None picks interpret mode when the default backend is CPU.
    """
    if interpret is None:
        interpret = default_interpret()
    return _causal_conv1d(x_BTC, state_BCW1, w_CW, b_C, lengths_B, block_t=block_t, block_c=block_c,
                          num_warps=num_warps, num_stages=num_stages, interpret=bool(interpret))


def _conv_step_kernel(x_ref, state_ref, w_ref, *refs, width: int, has_bias: bool):
    # x_ref [bc]; state_ref/ns_ref [bc, W-1]; w_ref [bc, W]; b_ref [bc]; y_ref [bc]
    b_ref, y_ref, ns_ref = _split_refs(refs, has_bias)
    W = width
    f32 = jnp.float32
    x = x_ref[...]
    cols = [state_ref[:, j].astype(x.dtype) for j in range(W - 1)] + [x]
    acc = cols[0].astype(f32) * w_ref[:, 0].astype(f32)
    for k in range(1, W):
        acc = acc + cols[k].astype(f32) * w_ref[:, k].astype(f32)
    if has_bias:
        acc = acc + b_ref[...].astype(f32)
    y_ref[...] = _silu(acc).astype(y_ref.dtype)
    for j in range(W - 1):
        ns_ref[:, j] = cols[j + 1].astype(ns_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_c", "num_warps", "num_stages", "interpret"))
def _causal_conv1d_step(x_BC, state_BCW1, w_CW, b_C, *, block_c, num_warps, num_stages, interpret):
    Bsz, C = x_BC.shape
    W = w_CW.shape[1]
    if W < 2:
        raise ValueError("conv width must be >= 2")
    bc = _pick_block_c(C, block_c)
    C_pad = round_up(C, bc)
    has_bias = b_C is not None
    args = [pad_axis(x_BC, 1, C_pad), pad_axis(state_BCW1, 1, C_pad), pad_axis(w_CW, 0, C_pad)]
    in_specs = [
        pl.BlockSpec((None, bc), lambda b, c: (b, c)),
        pl.BlockSpec((None, bc, W - 1), lambda b, c: (b, c, 0)),
        pl.BlockSpec((bc, W), lambda b, c: (c, 0)),
    ]
    if has_bias:
        args.append(pad_axis(b_C, 0, C_pad))
        in_specs.append(pl.BlockSpec((bc,), lambda b, c: (c,)))
    y, new_state = pl.pallas_call(
        functools.partial(_conv_step_kernel, width=W, has_bias=has_bias),
        grid=(Bsz, C_pad // bc),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bc), lambda b, c: (b, c)),
                   pl.BlockSpec((None, bc, W - 1), lambda b, c: (b, c, 0))],
        out_shape=[jax.ShapeDtypeStruct((Bsz, C_pad), x_BC.dtype),
                   jax.ShapeDtypeStruct((Bsz, C_pad, W - 1), x_BC.dtype)],
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="causal_conv1d_step",
    )(*args)
    if C_pad != C:
        y, new_state = y[:, :C], new_state[:, :C]
    return y, new_state


def causal_conv1d_step(x_BC, state_BCW1, w_CW, b_C, *, block_c: int = 256, num_warps: int = 4,
                       num_stages: int = 1, interpret: bool | None = False):
    """One-token causal conv update. Returns y [B,C] (after SiLU) and the new state [B,C,W-1].

    interpret=None picks interpret mode when the default backend is CPU.
    """
    if interpret is None:
        interpret = default_interpret()
    return _causal_conv1d_step(x_BC, state_BCW1, w_CW, b_C, block_c=block_c, num_warps=num_warps,
                               num_stages=num_stages, interpret=bool(interpret))
