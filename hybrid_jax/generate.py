"""Single-sequence helpers over the cached steps: greedy generation and piecewise prefill.

They exercise exactly the prefill/decode path the engine uses (one sequence in slot 1, blocks 1..M), which is
what the invariant tests compare against the uncached forward.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hybrid_jax.cache import init_cache
from hybrid_jax.config import ModelConfig
from hybrid_jax.model import SpanBatch, make_steps


def _bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


class SingleSequence:
    """One sequence in its own small cache (slot 1, blocks 1..M)."""

    def __init__(self, params, cfg: ModelConfig, max_len: int, block_size: int = 16):
        self.params, self.cfg, self.block_size = params, cfg, block_size
        m = -(-max_len // block_size)
        dtype = params["embed"].dtype
        self.cache = init_cache(cfg, num_blocks=m + 1, block_size=block_size, num_slots=2, dtype=dtype)
        self.table = jnp.arange(1, m + 1, dtype=jnp.int32)[None]
        self.length = 0
        self.prefill, self.prefill_all, self.decode = make_steps(cfg)

    def _batch(self, toks: list[int], pad_to: int) -> SpanBatch:
        t = np.zeros((1, pad_to), np.int32)
        t[0, :len(toks)] = toks
        return SpanBatch(tokens=jnp.asarray(t), start=jnp.array([self.length], jnp.int32),
                         length=jnp.array([len(toks)], jnp.int32), slot=jnp.array([1], jnp.int32),
                         block_table=self.table)

    def extend(self, toks: list[int], all_logits: bool = False):
        """Prefill toks after the current length; logits [V] of the last token, or [len, V] if all_logits."""
        fn = self.prefill_all if all_logits else self.prefill
        logits, self.cache = fn(self.params, self.cache, self._batch(toks, _bucket(len(toks))))
        self.length += len(toks)
        return logits[0, :len(toks)] if all_logits else logits[0]

    def step(self, tok: int):
        logits, self.cache = self.decode(self.params, self.cache, self._batch([tok], 1))
        self.length += 1
        return logits[0]


def generate_greedy(params, cfg: ModelConfig, prompt_ids: list[int], max_new_tokens: int,
                    block_size: int = 16) -> list[int]:
    """Greedy continuation of prompt_ids through the paged-cache prefill + decode path."""
    seq = SingleSequence(params, cfg, len(prompt_ids) + max_new_tokens, block_size)
    logits = seq.extend(list(prompt_ids))
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(jnp.argmax(logits))
        out.append(tok)
        if len(out) == max_new_tokens:
            break
        logits = seq.step(tok)
    return out
