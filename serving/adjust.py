"""The host side of the logit adjustments (`hybrid_jax.sampling.LogitAdjust`): for the rows of one step, the
grammar masks, the repetition-penalty marks and the additive bias (logit_bias, presence and frequency penalties,
stop tokens barred before min_tokens).

A request whose adjustment depends on its last sampled token (a grammar, a penalty) needs that token on the host
before its next step is built: `needs_last_token` tells the scheduler not to run it ahead on the device.
"""
from __future__ import annotations

import numpy as np

from hybrid_jax.sampling import mask_words
from serving.request import Request


def needs_adjust(r: Request, step: int) -> bool:
    """Whether r's row changes the logits at generated-token index `step`."""
    sp = r.sp
    return (r.matcher is not None or bool(sp.logit_bias) or step < sp.min_tokens or needs_last_token(r)
            or sp.repetition_penalty != 1.0)


def needs_last_token(r: Request) -> bool:
    sp = r.sp
    return (r.matcher is not None or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0
            or sp.repetition_penalty != 1.0)


def token_bits(ids, vocab_size: int) -> np.ndarray:
    """A [ceil(V/32)] int32 bitmask with the bits of `ids` set (bit v % 32 of word v // 32)."""
    bits = np.zeros(mask_words(vocab_size) * 32, bool)
    bits[np.asarray(ids, np.int64)] = True
    return np.packbits(bits, bitorder="little").view("<i4")


class AdjustBuilder:
    """Builds (masks [rows, 2, W] int32, bias [rows, V] f32 or None) for a step, or None when no row needs any.
    The dense bias is built only when a row adds to its logits (None: the caller keeps its neutral one, so a
    grammar-only step moves masks of V/32 words a row, not V floats).

    stop_ids(r): the ids min_tokens bars; grammar_fill(matchers, allowed [n, W], rows): fills the grammar masks of
    the given rows (the grammar engine, in parallel)."""

    def __init__(self, vocab_size: int, stop_ids, grammar_fill):
        self.V, self.W = vocab_size, mask_words(vocab_size)
        self.stop_ids, self.grammar_fill = stop_ids, grammar_fill

    def build(self, rows: int, reqs: list[Request], steps: list[int]):
        todo = [i for i, r in enumerate(reqs) if needs_adjust(r, steps[i])]
        if not todo:
            return None
        masks = np.zeros((rows, 2, self.W), np.int32)
        masks[:, 0] = -1
        bias = None
        for i in todo:
            r = reqs[i]
            for ids, values in self._bias_terms(r, steps[i]):
                if bias is None:
                    bias = np.zeros((rows, self.V), np.float32)
                bias[i, ids] += values
            if r.sp.repetition_penalty != 1.0:
                masks[i, 1] = self._seen(r)
        constrained = [i for i in todo if reqs[i].matcher is not None]
        if constrained:
            self.grammar_fill([reqs[i].matcher for i in constrained], masks[:, 0], constrained)
        return masks, bias

    def _bias_terms(self, r: Request, step: int) -> list[tuple]:
        """(distinct token ids, values added to their logits) of r's row at generated-token index `step`."""
        sp, out = r.sp, []
        if sp.logit_bias:
            ids, vals = zip(*sp.logit_bias)
            out.append((np.asarray(ids), np.asarray(vals, np.float32)))
        if step < sp.min_tokens and r.matcher is None:  # a grammar decides itself where its output ends
            out.append((np.asarray(sorted(t for t in self.stop_ids(r) if t < self.V)), -np.inf))
        if (sp.presence_penalty or sp.frequency_penalty) and r.generated:
            ids, counts = np.unique(np.asarray(r.generated), return_counts=True)
            out.append((ids, -(sp.presence_penalty + sp.frequency_penalty * counts.astype(np.float32))))
        return out

    def _seen(self, r: Request) -> np.ndarray:
        """The tokens of r's prompt and output, as a bitmask (the prompt's built once)."""
        if r.prompt_bits is None:
            r.prompt_bits = token_bits(r.prompt_ids, self.V)
        return r.prompt_bits | token_bits(r.generated, self.V) if r.generated else r.prompt_bits
