"""Sublayer math shared by the uncached forward, the cached prefill and the one-token decode.

Weights are stored [in, out] (transposed from torch at load time) so every projection is `x @ w`.
Norms and all Mamba recurrences run in float32; matmuls run in the parameter dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from hybrid_jax.config import ModelConfig


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * xf).astype(x.dtype)


def gated_group_norm(y, z, w, groups, eps):
    """Mamba2 gated RMSNorm: normalise y * silu(z) within each of `groups` channel groups."""
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    shp = h.shape
    h = h.reshape(*shp[:-1], groups, shp[-1] // groups)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * h.reshape(shp)).astype(z.dtype)


def linear(x, p, name):
    y = x @ p[name]
    b = p.get(name + "_b")
    return y if b is None else y + b


def mlp(p, x, cfg: ModelConfig):
    if cfg.mlp_kind == "relu2":
        return linear(jnp.square(jax.nn.relu(linear(x, p, "up"))), p, "down")
    return linear(jax.nn.silu(linear(x, p, "gate")) * linear(x, p, "up"), p, "down")


def rope(x_BTHD, pos_BT, cfg: ModelConfig):
    """Rotary embedding on the first cfg.rope_dim dims (rotate-half convention); identity when rope_dim == 0."""
    if cfg.rope_dim == 0:
        return x_BTHD
    r = cfg.rope_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))
    ang = pos_BT.astype(jnp.float32)[..., None] * inv  # [B,T,r/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    xr = x_BTHD[..., :r].astype(jnp.float32)
    rot = jnp.concatenate([-xr[..., r // 2:], xr[..., :r // 2]], -1)
    out = (xr * cos + rot * sin).astype(x_BTHD.dtype)
    return jnp.concatenate([out, x_BTHD[..., r:]], -1)


def qkv(p, x_BTD, pos_BT, cfg: ModelConfig):
    B, T, _ = x_BTD.shape
    q = linear(x_BTD, p, "q").reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = linear(x_BTD, p, "k").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = linear(x_BTD, p, "v").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    return rope(q, pos_BT, cfg), rope(k, pos_BT, cfg), v


def dense_causal_attention(q_BTHD, k_BTKD, v_BTKD, scale):
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    q = q_BTHD.reshape(B, T, K, H // K, D).astype(jnp.float32)
    s = jnp.einsum("btkgd,bjkd->bkgtj", q, k_BTKD.astype(jnp.float32)) * scale
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    o = jnp.einsum("bkgtj,bjkd->btkgd", jax.nn.softmax(s, -1), v_BTKD.astype(jnp.float32))
    return o.reshape(B, T, H, D).astype(q_BTHD.dtype)


def _dt(p, dt_raw, cfg: ModelConfig):
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
    return jnp.clip(dt, cfg.dt_min, cfg.dt_max)


def _shard_blocks(a, cfg: ModelConfig):
    """[..., tp * n] -> [..., tp, n]: the shard-major blocks of a tensor parallel layout (cfg.tp > 1)."""
    return a.reshape(*a.shape[:-1], cfg.tp, a.shape[-1] // cfg.tp)


def _split_in_proj(zxbcdt, cfg: ModelConfig):
    """(z [..., inner], xBC [..., conv_dim] in the conv's channel order, dt [..., H])."""
    i, c, t = cfg.mamba_inner // cfg.tp, cfg.conv_dim // cfg.tp, cfg.tp
    if t == 1:
        return zxbcdt[..., :i], zxbcdt[..., i:i + c], zxbcdt[..., i + c:]
    blk = _shard_blocks(zxbcdt, cfg)  # each shard's block: z | xBC | dt of its heads
    merge = lambda a: a.reshape(*a.shape[:-2], -1)
    return merge(blk[..., :i]), merge(blk[..., i:i + c]), merge(blk[..., i + c:])


def _split_xbc(xbc, cfg: ModelConfig):
    """(x [..., inner], B [..., ssm_groups * N], C [..., ssm_groups * N]) of the conv output."""
    i, gn = cfg.mamba_inner // cfg.tp, cfg.ssm_groups // cfg.tp * cfg.d_state
    if cfg.tp == 1:
        return xbc[..., :i], xbc[..., i:i + gn], xbc[..., i + gn:]
    blk = _shard_blocks(xbc, cfg)  # each shard's block: x | B | C
    merge = lambda a: a.reshape(*a.shape[:-2], -1)
    return merge(blk[..., :i]), merge(blk[..., i:i + gn]), merge(blk[..., i + gn:])


def _mamba_out(p, y_f32, x_ssm, z, cfg: ModelConfig):
    """D skip, gated group norm, out_proj. y_f32/x_ssm: [..., H, P]."""
    y = y_f32 + x_ssm.astype(jnp.float32) * p["D"].astype(jnp.float32)[:, None]
    y = y.reshape(*y.shape[:-2], cfg.mamba_inner)
    return linear(gated_group_norm(y, z, p["norm_w"], cfg.mamba_groups, cfg.rms_eps), p, "out_proj")


def mamba_span(p, x_BTD, conv_BCW, ssm_BHPN, length_B, cfg: ModelConfig):
    """Mamba2 mixer over a span that continues the given conv/SSM state; positions >= length_B are padding.

    Returns (out [B,T,D], conv state at length_B, SSM state at length_B).
    """
    B, T, _ = x_BTD.shape
    z, xbc, dt_raw = _split_in_proj(linear(x_BTD, p, "in_proj"), cfg)
    xbc, conv_new = pk.causal_conv1d(xbc, conv_BCW, p["conv_w"], p.get("conv_b"), length_B)
    xs, Bm, Cm = _split_xbc(xbc, cfg)
    valid = jnp.arange(T)[None, :] < length_B[:, None]
    dt = jnp.where(valid[..., None], _dt(p, dt_raw, cfg), 0.0)  # dt = 0 keeps the state fixed at padding
    L = cfg.chunk_size
    Tp = -(-T // L) * L
    pad = lambda a: jnp.pad(a, [(0, 0), (0, Tp - T)] + [(0, 0)] * (a.ndim - 2))
    xs_h = xs.reshape(B, T, cfg.mamba_heads, cfg.mamba_head_dim)
    y, ssm_new = pk.ssd_scan(pad(xs_h), pad(dt), -jnp.exp(p["A_log"].astype(jnp.float32)),
                             pad(Bm.reshape(B, T, cfg.ssm_groups, cfg.d_state)),
                             pad(Cm.reshape(B, T, cfg.ssm_groups, cfg.d_state)), ssm_BHPN, chunk_size=L)
    return _mamba_out(p, y[:, :T], xs_h, z, cfg), conv_new, ssm_new


def mamba_step(p, x_BD, conv_BCW, ssm_BHPN, cfg: ModelConfig):
    """Mamba2 mixer for one token per sequence. Returns (out [B,D], new conv state, new SSM state)."""
    B = x_BD.shape[0]
    z, xbc, dt_raw = _split_in_proj(linear(x_BD, p, "in_proj"), cfg)
    xbc, conv_new = pk.causal_conv1d_step(xbc, conv_BCW, p["conv_w"], p.get("conv_b"))
    xs, Bm, Cm = _split_xbc(xbc, cfg)
    xs_h = xs.reshape(B, cfg.mamba_heads, cfg.mamba_head_dim)
    y, ssm_new = pk.ssm_decode_step(ssm_BHPN, xs_h, _dt(p, dt_raw, cfg), -jnp.exp(p["A_log"].astype(jnp.float32)),
                                    Bm.reshape(B, cfg.ssm_groups, cfg.d_state),
                                    Cm.reshape(B, cfg.ssm_groups, cfg.d_state))
    return _mamba_out(p, y, xs_h, z, cfg), conv_new, ssm_new
