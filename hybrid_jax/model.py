"""The three pure steps: uncached forward, cached prefill of a token span, batched one-token decode."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels as pk
from hybrid_jax import layers as L
from hybrid_jax.cache import NULL_BLOCK, Cache, MambaState, PagedKV
from hybrid_jax.config import ModelConfig


def _embed(params, tokens, cfg: ModelConfig):
    return params["embed"][tokens] * jnp.asarray(cfg.embedding_multiplier, params["embed"].dtype)


def _logits(params, h, cfg: ModelConfig):
    h = L.rms_norm(h, params["final_norm"], cfg.rms_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("...d,vd->...v", h, head, preferred_element_type=jnp.float32)
    return logits / cfg.logits_scaling


def _residual(h, out, cfg: ModelConfig):
    return h + out * jnp.asarray(cfg.residual_multiplier, h.dtype)


def forward(params, cfg: ModelConfig, tokens):
    """Logits [B,T,V] float32 of int32 tokens [B,T], from scratch (no cache)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return _forward_jit(params, tokens, cfg=cfg)


def _sublayers(params, h, cfg: ModelConfig, attention, mamba):
    """The residual sublayer stack. attention(i, p, x) and mamba(i, p, x) are the i-th mixer of their kind
    (uncached or cached); norms, MLPs and residuals are shared by every path."""
    ai = mi = 0
    for kind, p in zip(cfg.sublayers, params["layers"]):
        x = L.rms_norm(h, p["norm"], cfg.rms_eps)
        if kind == "mlp":
            out = L.mlp(p, x, cfg)
        elif kind == "attention":
            out, ai = attention(ai, p, x), ai + 1
        else:
            out, mi = mamba(mi, p, x), mi + 1
        h = _residual(h, out, cfg)
    return h


@functools.partial(jax.jit, static_argnames="cfg")
def _forward_jit(params, tokens, *, cfg: ModelConfig):
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    def attention(i, p, x):
        q, k, v = L.qkv(p, x, pos, cfg)
        return L.linear(L.dense_causal_attention(q, k, v, cfg.attn_scale).reshape(B, T, -1), p, "o")

    def mamba(i, p, x):
        conv0 = jnp.zeros((B, cfg.conv_dim, cfg.d_conv - 1), x.dtype)
        ssm0 = jnp.zeros((B, cfg.mamba_heads, cfg.mamba_head_dim, cfg.d_state), jnp.float32)
        return L.mamba_span(p, x, conv0, ssm0, jnp.full((B,), T, jnp.int32), cfg)[0]

    return _logits(params, _sublayers(params, _embed(params, tokens, cfg), cfg, attention, mamba), cfg)


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


def _write_kv(pages, li, new_BTKD, block_table, pos_BT, valid_BT):
    S = pages.shape[2]
    blk = jnp.take_along_axis(block_table, pos_BT // S, axis=1)
    blk = jnp.where(valid_BT, blk, NULL_BLOCK)
    return pages.at[li, blk, pos_BT % S].set(new_BTKD.astype(pages.dtype))


def _run_span(params, cache: Cache, batch: SpanBatch, cfg: ModelConfig, decode: bool):
    B, T = batch.tokens.shape
    pos = batch.start[:, None] + jnp.arange(T)[None, :]
    valid = jnp.arange(T)[None, :] < batch.length[:, None]
    kv_len = batch.start + batch.length
    fresh = (batch.start == 0)
    st = {"k": cache.kv.k, "v": cache.kv.v, "conv": cache.mamba.conv, "ssm": cache.mamba.ssm}

    def attention(i, p, x):
        q, k, v = L.qkv(p, x, pos, cfg)
        st["k"] = _write_kv(st["k"], i, k, batch.block_table, pos, valid)
        st["v"] = _write_kv(st["v"], i, v, batch.block_table, pos, valid)
        if decode:
            o = pk.paged_decode_attention(q[:, 0], st["k"][i], st["v"][i], batch.block_table, kv_len,
                                          scale=cfg.attn_scale)[:, None]
        else:
            o = pk.paged_prefill_attention(q, st["k"][i], st["v"][i], batch.block_table, pos, kv_len,
                                           scale=cfg.attn_scale)
        return L.linear(o.reshape(B, T, -1), p, "o")

    def mamba(i, p, x):
        # A sequence starting at 0 begins from zero state whatever its slot held before.
        conv0 = jnp.where(fresh[:, None, None], 0, st["conv"][i, batch.slot]).astype(x.dtype)
        ssm0 = jnp.where(fresh[:, None, None, None], 0.0, st["ssm"][i, batch.slot])
        if decode:
            o, conv_new, ssm_new = L.mamba_step(p, x[:, 0], conv0, ssm0, cfg)
            out = o[:, None]
        else:
            out, conv_new, ssm_new = L.mamba_span(p, x, conv0, ssm0, batch.length, cfg)
        st["conv"] = st["conv"].at[i, batch.slot].set(conv_new.astype(st["conv"].dtype))
        st["ssm"] = st["ssm"].at[i, batch.slot].set(ssm_new)
        return out

    h = _sublayers(params, _embed(params, batch.tokens, cfg), cfg, attention, mamba)
    new_cache = Cache(kv=PagedKV(k=st["k"], v=st["v"]), mamba=MambaState(conv=st["conv"], ssm=st["ssm"]))
    return h, new_cache


def _prefill(params, cache, batch, *, cfg, all_logits):
    h, cache = _run_span(params, cache, batch, cfg, decode=False)
    if all_logits:
        return _logits(params, h, cfg), cache
    last = jnp.maximum(batch.length - 1, 0)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return _logits(params, h_last, cfg), cache


def _decode(params, cache, batch, *, cfg):
    h, cache = _run_span(params, cache, batch, cfg, decode=True)
    return _logits(params, h[:, 0], cfg), cache


@functools.lru_cache(maxsize=None)
def make_steps(cfg: ModelConfig):
    """Jitted (prefill, prefill_all_logits, decode) for cfg.

    Each takes (params, cache, batch) and donates `cache` (argument 1): its buffers are updated in place, so the
    caller must drop its reference and use the returned cache. prefill returns logits [B,V] of each row's last
    valid token; prefill_all_logits returns [B,T,V]; decode takes a SpanBatch with T == 1 and returns [B,V].
    """
    prefill = jax.jit(functools.partial(_prefill, cfg=cfg, all_logits=False), donate_argnums=1)
    prefill_all = jax.jit(functools.partial(_prefill, cfg=cfg, all_logits=True), donate_argnums=1)
    decode = jax.jit(functools.partial(_decode, cfg=cfg), donate_argnums=1)
    return prefill, prefill_all, decode
