"""The three pure steps: uncached forward, cached prefill of a token span, batched one-token decode."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels as pk
from hybrid_jax import layers as L
from hybrid_jax.cache import NULL_BLOCK, Cache, MambaState, PagedKV, constrain_cache
from hybrid_jax.config import ModelConfig
from hybrid_jax.mesh import replicated
from hybrid_jax.stack import Mixers, run_stack


def _embed(params, tokens, cfg: ModelConfig):
    return params["embed"][tokens] * jnp.asarray(cfg.embedding_multiplier, params["embed"].dtype)


def logits(params, h, cfg: ModelConfig):
    """Logits float32 of final hidden states h [..., D] (gathered onto every device with tensor parallelism)."""
    h = L.rms_norm(h, params["final_norm"], cfg.rms_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    out = jnp.einsum("...d,vd->...v", h, head, preferred_element_type=jnp.float32)
    return replicated(out / cfg.logits_scaling, cfg)  # tensor parallel: gathered once, here


def forward(params, cfg: ModelConfig, tokens):
    """Logits [B,T,V] float32 of int32 tokens [B,T], from scratch (no cache). params: list or stacked form.
    Jitted per cfg; donates nothing."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return _forward_jit(params, tokens, cfg=cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _forward_jit(params, tokens, *, cfg: ModelConfig):
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    def mamba(p, x, state, j):
        conv0 = jnp.zeros((B, cfg.conv_dim, cfg.d_conv - 1), x.dtype)
        ssm0 = jnp.zeros((B, cfg.mamba_heads, cfg.mamba_head_dim, cfg.d_state), jnp.float32)
        return L.mamba_span(p, x, conv0, ssm0, jnp.full((B,), T, jnp.int32), cfg)[0], state

    mixers = Mixers(mamba=mamba, write_kv=lambda state, j, k, v, on: state,
                    attend=lambda p, q, k, v, state, j: L.dense_causal_attention(q, k, v, cfg.attn_scale).reshape(
                        B, T, -1))
    h, _ = run_stack(params, _embed(params, tokens, cfg), pos, (), cfg, mixers)
    return logits(params, h, cfg)


@struct.dataclass
class SpanBatch:
    """A ragged batch of token spans to run against the cache (prefill; decode is the T == 1 case).

    tokens [B,T] int32; start [B]: tokens already in the cache; length [B]: valid tokens of the span
    (0 for padding rows); slot [B]: the Mamba slot the row owns; block_table [B,M]: its KV blocks.
    Padding rows use slot 0 and block 0 (scratch).
    """
    tokens: jax.Array
    start: jax.Array
    length: jax.Array
    slot: jax.Array
    block_table: jax.Array


def _write_kv(pool_LNSKD, j, new_BTKD, block_table, pos_BT, valid_BT):
    """Scatter a span's K or V into layer j of the pool; padding positions go to the scratch block."""
    S = pool_LNSKD.shape[2]
    blk = jnp.take_along_axis(block_table, pos_BT // S, axis=1)
    blk = jnp.where(valid_BT, blk, NULL_BLOCK)
    return pool_LNSKD.at[j, blk, pos_BT % S].set(new_BTKD.astype(pool_LNSKD.dtype))


def _layer_pages(pool_LNSKD, j, block_table):
    """Layer j's pages as a flat [L*N, S, K, D] view (a reshape: no copy) and the table offset into it."""
    La, N = pool_LNSKD.shape[:2]
    return pool_LNSKD.reshape(La * N, *pool_LNSKD.shape[2:]), block_table + j * N


def _pad_row(batch: SpanBatch) -> SpanBatch:
    """batch plus one padding row (scratch slot and block, length 0)."""
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros_like(a[:1])]), batch)


def run_span(params, cache: Cache, batch: SpanBatch, cfg: ModelConfig, decode: bool):
    """(h [B,T,D] after the stack, the cache): a span batch run through the stack against the cache pools,
    updating them in place (traced inside a step that donates the cache).

    The pools ride in the layer scan's carry: each layer gathers its rows' state (B rows) and scatters the new
    state back, so no step copies or rewrites a whole pool (tests/test_engine_scale.py checks the programs).
    """
    if batch.tokens.shape[0] == 1:
        # One row: XLA turns the state scatter into a dynamic-update-slice and then copies the whole SSM pool
        # inside the layer loop. A second (padding) row keeps it a scatter, updated in place.
        h, cache = run_span(params, cache, _pad_row(batch), cfg, decode)
        return h[:1], cache
    B, T = batch.tokens.shape
    pos = batch.start[:, None] + jnp.arange(T)[None, :]
    valid = jnp.arange(T)[None, :] < batch.length[:, None]
    kv_len = batch.start + batch.length
    fresh = batch.start == 0
    live = batch.length > 0

    def write_kv(st, j, k, v, on):
        ok = valid & on
        return dict(st, k=_write_kv(st["k"], j, k, batch.block_table, pos, ok),
                    v=_write_kv(st["v"], j, v, batch.block_table, pos, ok))

    def attend(p, q, k, v, st, j):
        k_pages, table = _layer_pages(st["k"], j, batch.block_table)
        v_pages, _ = _layer_pages(st["v"], j, batch.block_table)
        if decode:
            o = pk.paged_decode_attention(q[:, 0], k_pages, v_pages, table, kv_len, scale=cfg.attn_scale)[:, None]
        else:
            o = pk.paged_prefill_attention(q, k_pages, v_pages, table, pos, kv_len, scale=cfg.attn_scale)
        return o.reshape(B, T, -1)

    def mamba(p, x, st, j):
        # A sequence starting at 0 begins from zero state whatever its slot held before.
        conv0 = jnp.where(fresh[:, None, None], 0, st["conv"][j, batch.slot]).astype(x.dtype)
        ssm0 = jnp.where(fresh[:, None, None, None], 0.0, st["ssm"][j, batch.slot])
        if decode:
            o, conv_new, ssm_new = L.mamba_step(p, x[:, 0], conv0, ssm0, cfg)
            # A row with length 0 (a masked stop token) leaves its state as it was.
            conv_new = jnp.where(live[:, None, None], conv_new, conv0)
            ssm_new = jnp.where(live[:, None, None, None], ssm_new, ssm0)
            out = o[:, None]
        else:
            out, conv_new, ssm_new = L.mamba_span(p, x, conv0, ssm0, batch.length, cfg)
        st = dict(st, conv=st["conv"].at[j, batch.slot].set(conv_new.astype(st["conv"].dtype)),
                  ssm=st["ssm"].at[j, batch.slot].set(ssm_new))
        return out, st

    st = {"k": cache.kv.k, "v": cache.kv.v, "conv": cache.mamba.conv, "ssm": cache.mamba.ssm}
    mixers = Mixers(mamba=mamba, write_kv=write_kv, attend=attend)
    h, st = run_stack(params, _embed(params, batch.tokens, cfg), pos, st, cfg, mixers)
    new_cache = Cache(kv=PagedKV(k=st["k"], v=st["v"]), mamba=MambaState(conv=st["conv"], ssm=st["ssm"]))
    return h, constrain_cache(new_cache, cfg)


def last_valid(h_BTD, length_B):
    """h [B,D] at each row's last valid token (row b's position length[b] - 1; 0 for a padding row)."""
    last = jnp.maximum(length_B - 1, 0)
    return jnp.take_along_axis(h_BTD, last[:, None, None], axis=1)[:, 0]


def donating_step(fn, *, static_argnames=(), **bound):
    """jax.jit of a step fn(params, cache, ...) with the keyword arguments `bound` fixed. Every cached step is
    built here: it donates `cache` (argument 1), whose buffers are updated in place, so the caller must drop its
    reference and use the returned cache."""
    return jax.jit(functools.partial(fn, **bound), static_argnames=static_argnames, donate_argnums=1)


def _prefill(params, cache, batch, *, cfg, all_logits):
    h, cache = run_span(params, cache, batch, cfg, decode=False)
    return logits(params, h if all_logits else last_valid(h, batch.length), cfg), cache


def _decode(params, cache, batch, *, cfg):
    h, cache = run_span(params, cache, batch, cfg, decode=True)
    return logits(params, h[:, 0], cfg), cache


@functools.lru_cache(maxsize=32)
def make_steps(cfg: ModelConfig):
    """Jitted (prefill, prefill_all_logits, decode) for cfg, each built by `donating_step`.

    Each takes (params, cache, batch) and donates `cache` (argument 1): its buffers are updated in place, so the
    caller must drop its reference and use the returned cache. prefill returns logits [B,V] of each row's last
    valid token; prefill_all_logits returns [B,T,V]; decode takes a SpanBatch with T == 1 and returns [B,V].
    The engine's steps (hybrid_jax/fused.py `make_serving_steps`) run the same spans with sampling fused in.
    """
    prefill = donating_step(_prefill, cfg=cfg, all_logits=False)
    prefill_all = donating_step(_prefill, cfg=cfg, all_logits=True)
    decode = donating_step(_decode, cfg=cfg)
    return prefill, prefill_all, decode
