"""Paged GQA attention (ragged prefill over a paged prefix, and decode) as a Pallas (Triton) kernel.

Same signatures and semantics as `reference.paged_prefill_attention` / `reference.paged_decode_attention`.

Layout trick for GQA: the G = H // K query heads that share kv head k, for all T query tokens, are packed into the
rows of one matrix, row r = t * G + g, so one kernel instance computes [block_q rows] x [block_k keys] tiles
against one kv head and every K/V tile is loaded once per query block instead of once per query head. Decode is the
same kernel with T = 1 (rows = the G heads of the group, padded to 16 for the tensor cores).

Grid: (batch, kv head, row block). Each instance runs a flash-attention (online softmax) loop over kv blocks of
`pages_per_block` pages gathered through the block table, only up to min(kv_len, max q_pos in the block + 1), so
causal and ragged tails are skipped; the exact mask (j <= q_pos[row]) & (j < kv_len) is applied elementwise.
Rows that see nothing (padding, q_pos < 0, kv_len == 0) return 0, like the reference.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import default_interpret, dot_f32, next_pow2, pad_axis, round_up, triton_params

_NEG = -1e30  # finite "minus infinity": keeps every exp() NaN-free in the online softmax


def _attn_kernel(len_ref, qpos_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float, pages_per_block: int,
                 page_size: int):
    # len_ref [1] i32, qpos_ref [bq] i32, bt_ref [M_pad] i32, q_ref [bq, D], k_ref/v_ref [N, S, D], o_ref [bq, D]
    block_q, head_dim = q_ref.shape
    block_k = pages_per_block * page_size
    kv_len = len_ref[0]
    qpos = qpos_ref[...]
    q = q_ref[...]
    hi = jnp.minimum(kv_len, jnp.max(qpos) + 1)  # keys at or past hi are masked for every row of the block
    num_blocks = (jnp.maximum(hi, 0) + block_k - 1) // block_k

    def body(i, carry):
        acc, m, l = carry
        pages = bt_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_k, head_dim)
        v = v_ref[pages].reshape(block_k, head_dim)
        j = i * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        s = dot_f32(q, k.astype(q.dtype), contract_a=1, contract_b=1) * scale  # [bq, bk] f32
        mask = (j[None, :] <= qpos[:, None]) & (j[None, :] < kv_len)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        l_new = alpha * l + jnp.sum(p, axis=1)
        v = jnp.where((j < kv_len)[:, None], v, 0)  # stale / uninitialised page tails never reach the output
        pv = dot_f32(p.astype(v.dtype), v)
        return acc * alpha[:, None] + pv, m_new, l_new

    acc0 = jnp.zeros((block_q, head_dim), jnp.float32)
    m0 = jnp.full((block_q,), _NEG, jnp.float32)
    l0 = jnp.zeros((block_q,), jnp.float32)
    acc, _, l = lax.fori_loop(0, num_blocks, body, (acc0, m0, l0))
    out = jnp.where((l > 0)[:, None], acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "pages_per_block", "num_warps", "num_stages",
                                             "interpret"))
def _paged_attention_rows(q_BTHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, q_pos_BT, kv_len_B, *, scale: float,
                          block_q: int, pages_per_block: int, num_warps: int, num_stages: int, interpret: bool):
    Bsz, T, H, D = q_BTHD.shape
    N, S, K, _ = k_pages_NSKD.shape
    G = H // K
    R = T * G
    bq = min(block_q, max(16, next_pow2(R)))
    R_pad = round_up(R, bq)
    ppb = pages_per_block
    M_pad = round_up(block_tables_BM.shape[1], ppb)

    # rows r = t * G + g for kv head k: [B, K, T*G, D]
    q_rows = jnp.transpose(q_BTHD.reshape(Bsz, T, K, G, D), (0, 2, 1, 3, 4)).reshape(Bsz, K, R, D)
    q_rows = pad_axis(q_rows, 2, R_pad)
    qpos_rows = pad_axis(jnp.repeat(q_pos_BT.astype(jnp.int32), G, axis=1), 1, R_pad, value=-1)
    # Entries past a sequence's pages may be garbage (-1, stale ids): clip so every gather stays in bounds.
    bt = pad_axis(jnp.clip(block_tables_BM.astype(jnp.int32), 0, N - 1), 1, M_pad)
    kv_len = kv_len_B.astype(jnp.int32)

    kernel = functools.partial(_attn_kernel, scale=float(scale), pages_per_block=ppb, page_size=S)
    out = pl.pallas_call(
        kernel,
        grid=(Bsz, K, R_pad // bq),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, i: (b,)),                                # kv_len
            pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),                        # q positions of the rows
            pl.BlockSpec((None, M_pad), lambda b, h, i: (b, 0)),                     # block table row
            pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),         # q rows
            pl.BlockSpec((N, S, None, D), lambda b, h, i: (0, 0, h, 0)),             # k pages of kv head h
            pl.BlockSpec((N, S, None, D), lambda b, h, i: (0, 0, h, 0)),             # v pages of kv head h
        ],
        out_specs=pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((Bsz, K, R_pad, D), q_BTHD.dtype),
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention",
    )(kv_len, qpos_rows, bt, q_rows, k_pages_NSKD, v_pages_NSKD)
    out = out[:, :, :R].reshape(Bsz, K, T, G, D)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(Bsz, T, H, D)


def _call(q_BTHD, k_pages, v_pages, block_tables, q_pos, kv_len, scale, block_q, block_k, num_warps, num_stages,
          interpret):
    if interpret is None:
        interpret = default_interpret()
    S = k_pages.shape[1]
    ppb = max(1, block_k // S)
    ppb = 1 << (ppb.bit_length() - 1)  # pages per kv step: a power of 2 (it is the length of a loaded vector)
    if not isinstance(scale, numbers.Real):  # traced scale: fold it into q, run the kernel with scale 1
        q_BTHD = (q_BTHD.astype(jnp.float32) * scale).astype(q_BTHD.dtype)
        scale = 1.0
    return _paged_attention_rows(q_BTHD, k_pages, v_pages, block_tables, q_pos, kv_len, scale=float(scale),
                                 block_q=block_q, pages_per_block=ppb, num_warps=num_warps, num_stages=num_stages,
                                 interpret=bool(interpret))


def paged_prefill_attention(q_BTHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, q_pos_BT, kv_len_B, *,
                            scale: float, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool | None = False):
    """Causal GQA attention of a ragged batch of query spans over their paged KV (see the reference).

    block_q: packed (token, head-in-group) rows per instance (power of 2, >= 16 for the GPU);
    block_k: keys per inner step, rounded down to a power-of-2 number of whole pages (at least one). On the GPU
    page_size, head_dim and block_q must be powers of 2 and block_q, block_k >= 16.
    interpret=None picks interpret mode when the default backend is CPU.
    """
    return _call(q_BTHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, q_pos_BT, kv_len_B, scale, block_q, block_k,
                 num_warps, num_stages, interpret)


def paged_decode_attention(q_BHD, k_pages_NSKD, v_pages_NSKD, block_tables_BM, kv_len_B, *, scale: float,
                           block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool | None = False):
    """One query per sequence over its first kv_len_B[b] paged positions (GQA). Returns [B,H,D]."""
    q_pos = (kv_len_B.astype(jnp.int32) - 1)[:, None]
    out = _call(q_BHD[:, None], k_pages_NSKD, v_pages_NSKD, block_tables_BM, q_pos, kv_len_B, scale, 16, block_k,
                num_warps, num_stages, interpret)
    return out[:, 0]
