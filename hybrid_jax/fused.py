"""The engine's device steps: a span step (prefill chunk or decode) with sampling fused in, fed by two packed
host arrays.

Inputs per row, built as numpy by the host in one pass (`pack_rows`):
  ints   [B, T + NUM_STOP + len(INT_FIELDS) + W] int32: tokens [T] | stop ids [NUM_STOP] (-1 pad) | fields | table [W]
  floats [B, len(FLOAT_FIELDS)] float32
  adjust LogitAdjust (masks [B, 2, ceil(V/32)] int32, bias [B, V] f32): grammar masks, biases and penalties; a
         batch without any passes device-resident neutral arrays (`neutral_adjust`), so nothing is transferred
Decode (T == 1) may take a row's input token from the previous decode step's output still on the device
(`src` >= 0 indexes it), so the host dispatches step N+1 before reading step N's tokens. Such a token that is
one of the row's stop ids is not fed: the row runs with length 0 and its state stays at the stop (the turn's
committed state never contains its stop token).

Both steps donate the cache (argument 1) and return (Sampled, cache). Sampled.token is padded to `rows_out`
rows so the next decode step's `prev` input has one shape.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hybrid_jax.config import ModelConfig
from hybrid_jax.model import SpanBatch, donating_step, last_valid, logits, run_span
from hybrid_jax.sampling import LogitAdjust, SamplingBatch, mask_words, sample_tokens

NUM_STOP = 8
INT_FIELDS = ("start", "length", "slot", "top_k", "seed", "step", "src")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition")


@struct.dataclass
class Sampled:
    token: jax.Array    # [rows_out] int32 (rows past B are 0)
    logprob: jax.Array  # [B]
    top_ids: jax.Array  # [B, 5]
    top_lp: jax.Array   # [B, 5]


def pack_rows(tokens: np.ndarray, stops: np.ndarray, fields: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[B,T] | [B,NUM_STOP] | [B,len(INT_FIELDS)] | [B,W] -> one int32 array (fields' seed as uint32 bits)."""
    return np.concatenate([tokens, stops, fields.astype(np.int64).astype(np.uint32).view(np.int32), table],
                          axis=1).astype(np.int32, copy=False)


def _unpack(ints, floats, T: int):
    F = len(INT_FIELDS)
    tokens, stops = ints[:, :T], ints[:, T:T + NUM_STOP]
    f = {name: ints[:, T + NUM_STOP + i] for i, name in enumerate(INT_FIELDS)}
    table = ints[:, T + NUM_STOP + F:]
    fl = {name: floats[:, i] for i, name in enumerate(FLOAT_FIELDS)}
    sb = SamplingBatch(temperature=fl["temperature"], top_k=f["top_k"], top_p=fl["top_p"], min_p=fl["min_p"],
                       seed=jax.lax.bitcast_convert_type(f["seed"], jnp.uint32), step=f["step"],
                       repetition=fl["repetition"])
    batch = SpanBatch(tokens=tokens, start=f["start"], length=f["length"], slot=f["slot"], block_table=table)
    return batch, sb, stops, f["src"]


def neutral_adjust(rows: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks, bias) of a batch whose rows change nothing: every token allowed, none seen, no bias."""
    masks = np.zeros((rows, 2, mask_words(vocab_size)), np.int32)
    masks[:, 0] = -1
    return masks, np.zeros((rows, vocab_size), np.float32)


def _sampled(params, h_BD, sb, adj, cfg, rows_out):
    tok, lp, top_ids, top_lp = sample_tokens(logits(params, h_BD, cfg), sb, adj)
    return Sampled(jnp.zeros((rows_out,), jnp.int32).at[:tok.shape[0]].set(tok), lp, top_ids, top_lp)


def _prefill_step(params, cache, ints, floats, masks, bias, *, cfg, T, rows_out):
    batch, sb, _, _ = _unpack(ints, floats, T)
    h, cache = run_span(params, cache, batch, cfg, decode=False)
    return _sampled(params, last_valid(h, batch.length), sb, LogitAdjust(masks, bias), cfg, rows_out), cache


def _decode_step(params, cache, ints, floats, masks, bias, prev_token, *, cfg, rows_out):
    batch, sb, stops, src = _unpack(ints, floats, 1)
    from_prev = src >= 0
    tok = jnp.where(from_prev, prev_token[jnp.clip(src, 0, prev_token.shape[0] - 1)], batch.tokens[:, 0])
    stopped = from_prev & jnp.any(tok[:, None] == stops, axis=1)
    batch = batch.replace(tokens=tok[:, None], length=jnp.where(stopped, 0, batch.length))
    h, cache = run_span(params, cache, batch, cfg, decode=True)
    return _sampled(params, h[:, 0], sb, LogitAdjust(masks, bias), cfg, rows_out), cache


@functools.lru_cache(maxsize=32)
def make_serving_steps(cfg: ModelConfig, rows_out: int):
    """(prefill(params, cache, ints, floats, masks, bias, *, T), decode(params, cache, ints, floats, masks, bias,
    prev_token)).

    Both are jitted by hybrid_jax/model.py `donating_step`, as `make_steps` builds its steps, and donate `cache`
    (argument 1) only; T is static (the chunk bucket); masks and bias are the rows' LogitAdjust; prev_token is
    [rows_out] int32.
    """
    prefill = donating_step(_prefill_step, static_argnames="T", cfg=cfg, rows_out=rows_out)
    decode = donating_step(_decode_step, cfg=cfg, rows_out=rows_out)
    return prefill, decode
