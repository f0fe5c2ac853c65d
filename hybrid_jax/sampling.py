"""Batched sampling on device: logit adjustments (grammar masks, biases, penalties), greedy, temperature, top-k,
top-p, min-p, per-row seeds.

Rows carry their own parameters, so one compiled function serves any mix of requests. Each row's key is
fold_in(PRNGKey(seed), step): a request samples the same tokens whatever batch it shares.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

NUM_TOP_LOGPROBS = 5


@struct.dataclass
class SamplingBatch:
    temperature: jax.Array  # [B] f32; 0 = greedy
    top_k: jax.Array        # [B] i32; <= 0 = off
    top_p: jax.Array        # [B] f32; 1 = off
    min_p: jax.Array        # [B] f32; 0 = off
    seed: jax.Array         # [B] u32
    step: jax.Array         # [B] i32, tokens sampled so far by the row
    repetition: jax.Array   # [B] f32 repetition penalty on the tokens marked seen; 1 = off


@struct.dataclass
class LogitAdjust:
    """Per-row changes to the logits before sampling, built by the host (all neutral for plain rows).

    masks [B, 2, W] int32, W = ceil(V / 32), bit v % 32 of word v // 32 for token v: [:, 0] tokens allowed (a
    grammar's mask; all bits set = no constraint), [:, 1] tokens seen in the prompt and output (repetition
    penalty). bias [B, V] f32 is added to the logits (logit_bias, presence and frequency penalties, -inf on stop
    tokens before min_tokens).
    """
    masks: jax.Array
    bias: jax.Array


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def _bits(words_BW, V: int):
    """[B, W] int32 bitmask -> [B, V] bool."""
    v = jnp.arange(V)
    return ((words_BW[:, v // 32] >> (v % 32)) & 1).astype(bool)


def adjust_logits(logits_BV, adj: LogitAdjust, repetition_B):
    """Repetition penalty (positive logits divided, negative multiplied), then the bias, then the grammar mask."""
    V = logits_BV.shape[-1]
    rep = repetition_B[:, None]
    seen = _bits(adj.masks[:, 1], V)
    out = jnp.where(seen, jnp.where(logits_BV > 0, logits_BV / rep, logits_BV * rep), logits_BV) + adj.bias
    return jnp.where(_bits(adj.masks[:, 0], V), out, -jnp.inf)


def _sample_full(logits, sb: SamplingBatch):
    """Temperature, top-k, top-p and min-p sampling (sorts the vocabulary); greedy rows take the argmax."""
    V = logits.shape[-1]
    t = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    scaled = logits / t
    order = jnp.argsort(-scaled, axis=-1)
    sorted_l = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = jnp.where(sb.top_k[:, None] > 0, rank < sb.top_k[:, None], True)
    probs = jax.nn.softmax(sorted_l, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= cum_before < sb.top_p[:, None]          # the top token always survives
    keep &= probs >= sb.min_p[:, None] * probs[:, :1]
    masked = jnp.where(keep, sorted_l, -jnp.inf)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(sb.seed, sb.step)
    pick = jax.vmap(jax.random.categorical)(keys, masked)
    sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]
    return jnp.where(sb.temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def sample_tokens(logits_BV: jax.Array, sb: SamplingBatch, adj: LogitAdjust | None = None):
    """Returns (token [B] i32, logprob of token [B], top ids [B,5], top logprobs [B,5]). Tokens are sampled from
    the adjusted logits; logprobs are those of the raw model distribution (before adjustments, temperature and
    truncation, as OpenAI and vLLM report them).

    Traceable (fused into the engine's steps). When every row is greedy the vocabulary is never sorted.
    """
    raw = logits_BV.astype(jnp.float32)
    logp = jax.nn.log_softmax(raw, axis=-1)
    logits = raw if adj is None else adjust_logits(raw, adj, sb.repetition)
    token = jax.lax.cond(jnp.any(sb.temperature > 0), _sample_full,
                         lambda l, sb: jnp.argmax(l, axis=-1).astype(jnp.int32), logits, sb)
    tok_lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, NUM_TOP_LOGPROBS)
    return token, tok_lp, top_ids, top_lp

