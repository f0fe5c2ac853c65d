"""Plain-jnp references for every hot path. They are the CPU default and the ground truth for the kernels.

Shape letters: B batch, T tokens, H heads, P head dim (Mamba), N state size, G groups, K kv heads, D head dim
(attention), C conv channels, W conv width (d_conv), S block size, M blocks per sequence.
All Mamba math runs in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _heads_from_groups(x_BTGN: jax.Array, num_heads: int) -> jax.Array:
    """Repeat group-shared B/C to per-head: head h reads group h // (H // G)."""
    groups = x_BTGN.shape[-2]
    return jnp.repeat(x_BTGN, num_heads // groups, axis=-2)


def ssd_scan(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, init_BHPN, *, chunk_size: int, return_chunk_states: bool = False):
    """Mamba2 SSD chunked scan with an initial state.

    dt is already discretised (softplus, limits) and is 0 at padding positions, which leaves the state untouched
    there. T must be a multiple of chunk_size. No D skip (added by the caller).
    Returns y [B,T,H,P] f32, final state [B,H,P,N] f32 and, if asked, the state at the end of every chunk
    [B, T//chunk_size, H, P, N].
    """
    Bsz, T, H, P = x_BTHP.shape
    L = chunk_size
    c = T // L
    f32 = jnp.float32
    x = x_BTHP.astype(f32) * dt_BTH.astype(f32)[..., None]
    a = dt_BTH.astype(f32) * A_H.astype(f32)  # [B,T,H], <= 0
    Bh = _heads_from_groups(B_BTGN.astype(f32), H)
    Ch = _heads_from_groups(C_BTGN.astype(f32), H)
    x, a, Bh, Ch = (t.reshape(Bsz, c, L, *t.shape[2:]) for t in (x, a, Bh, Ch))
    a_cum = jnp.cumsum(a, axis=2)  # [B,c,L,H]
    # Intra-chunk decay exp(cum_l - cum_s) for l >= s; masked before exp so nothing overflows.
    diff = a_cum[:, :, :, None, :] - a_cum[:, :, None, :, :]  # [B,c,l,s,H]
    causal = jnp.tril(jnp.ones((L, L), bool))[None, None, :, :, None]
    decay_ls = jnp.exp(jnp.where(causal, diff, -jnp.inf))
    scores = jnp.einsum("bclhn,bcshn->bclsh", Ch, Bh) * decay_ls
    y_diag = jnp.einsum("bclsh,bcshp->bclhp", scores, x)
    decay_to_end = jnp.exp(a_cum[:, :, -1:, :] - a_cum)  # [B,c,L,H]
    chunk_in = jnp.einsum("bclhn,bclh,bclhp->bchpn", Bh, decay_to_end, x)
    chunk_decay = jnp.exp(a_cum[:, :, -1, :])  # [B,c,H]

    def step(state, inp):
        contrib, decay = inp
        new = state * decay[:, :, None, None] + contrib
        return new, (state, new)

    final, (starts, ends) = jax.lax.scan(
        step, init_BHPN.astype(f32), (jnp.moveaxis(chunk_in, 1, 0), jnp.moveaxis(chunk_decay, 1, 0)))
    starts = jnp.moveaxis(starts, 0, 1)  # [B,c,H,P,N] state entering each chunk
    y_off = jnp.einsum("bclhn,bchpn->bclhp", Ch, starts) * jnp.exp(a_cum)[..., None]
    y = (y_diag + y_off).reshape(Bsz, T, H, P)
    if return_chunk_states:
        return y, final, jnp.moveaxis(ends, 0, 1)
    return y, final


def ssm_decode_step(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN):
    """One-token Mamba2 state update. Returns y [B,H,P] f32 (no D skip) and the new state [B,H,P,N] f32."""
    f32 = jnp.float32
    H = x_BHP.shape[1]
    dt = dt_BH.astype(f32)
    dA = jnp.exp(dt * A_H.astype(f32))  # [B,H]
    Bh = _heads_from_groups(B_BGN.astype(f32), H)  # [B,H,N]
    Ch = _heads_from_groups(C_BGN.astype(f32), H)
    new = state_BHPN.astype(f32) * dA[:, :, None, None] + (dt[:, :, None] * x_BHP.astype(f32))[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", new, Ch)
    return y, new


def causal_conv1d(x_BTC, state_BCW1, w_CW, b_C, lengths_B):
    """Depthwise causal conv over a span that continues `state` (the last W-1 inputs, oldest first), then SiLU.

    Returns y [B,T,C] and the state after the first lengths_B[b] inputs of the span [B,C,W-1].
    """
    W = w_CW.shape[1]
    full = jnp.concatenate([state_BCW1.astype(x_BTC.dtype), jnp.swapaxes(x_BTC, 1, 2)], axis=2)  # [B,C,W-1+T]
    T = x_BTC.shape[1]
    acc = sum(full[:, :, k:k + T].astype(jnp.float32) * w_CW[None, :, k, None].astype(jnp.float32) for k in range(W))
    if b_C is not None:
        acc = acc + b_C.astype(jnp.float32)[None, :, None]
    y = jax.nn.silu(acc).astype(x_BTC.dtype)
    new_state = jax.vmap(lambda f, n: jax.lax.dynamic_slice_in_dim(f, n, W - 1, axis=1))(full, lengths_B)
    return jnp.swapaxes(y, 1, 2), new_state


def causal_conv1d_step(x_BC, state_BCW1, w_CW, b_C):
    """One-token causal conv update. Returns y [B,C] (after SiLU) and the new state [B,C,W-1]."""
    full = jnp.concatenate([state_BCW1.astype(x_BC.dtype), x_BC[:, :, None]], axis=2)  # [B,C,W]
    acc = jnp.einsum("bcw,cw->bc", full.astype(jnp.float32), w_CW.astype(jnp.float32))
    if b_C is not None:
        acc = acc + b_C.astype(jnp.float32)
    return jax.nn.silu(acc).astype(x_BC.dtype), full[:, :, 1:]


def _gather_pages(pages_NSKD, block_tables_BM):
    g = pages_NSKD[block_tables_BM]  # [B,M,S,K,D]
    Bsz, M, S, K, D = g.shape
    return g.reshape(Bsz, M * S, K, D)


def paged_prefill_attention(q_BTHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, q_pos_BT, kv_len_B, *, scale: float):
    """Causal GQA attention of a ragged batch of query spans over their paged KV (the span's own K/V included).

    Query t of row b sits at absolute position q_pos[b,t] and sees kv positions j <= q_pos[b,t], j < kv_len[b].
    """
    Bsz, T, H, D = q_BTHD.shape
    k = _gather_pages(k_pages_NSKD, block_tables_BM)  # [B,Lk,K,D]
    v = _gather_pages(v_pages_NSKD, block_tables_BM)
    K = k.shape[2]
    q = q_BTHD.reshape(Bsz, T, K, H // K, D)
    s = jnp.einsum("btkgd,bjkd->bkgtj", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    j = jnp.arange(k.shape[1])
    mask = (j[None, None, :] <= q_pos_BT[:, :, None]) & (j[None, None, :] < kv_len_B[:, None, None])  # [B,T,Lk]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)  # fully masked (padding) rows
    o = jnp.einsum("bkgtj,bjkd->btkgd", p, v.astype(jnp.float32))
    return o.reshape(Bsz, T, H, D).astype(q_BTHD.dtype)


def paged_decode_attention(q_BHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, kv_len_B, *, scale: float):
    """One query per sequence over its first kv_len_B[b] paged positions (GQA). Returns [B,H,D]."""
    out = paged_prefill_attention(q_BHD[:, None], k_pages_NSKD, v_pages_NSKD, block_tables_BM,
                                  (kv_len_B - 1)[:, None], kv_len_B, scale=scale)
    return out[:, 0]
