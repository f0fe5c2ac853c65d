"""Compiling specs for one tokenizer, per-request matchers, and filling token masks in parallel.

Mask layout (llguidance's): one int32 row of ``bitmask_words(V)`` words per constrained request; bit ``i % 32`` of
word ``i // 32`` set = token i allowed.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import llguidance
import numpy as np

from serving.grammar.sources import grammar_text
from serving.grammar.spec import GrammarError, GrammarSpec
from serving.grammar.vocab import ll_tokenizer, special_tokens

_MAX_ERROR_CHARS = 1000


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one mask row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def _error_text(message: str) -> str:
    """llguidance's error message without its parser-state dump, capped."""
    message = message.split("\n<state>", 1)[0].strip()
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + " ..."


class Grammar:
    """A spec compiled for one tokenizer: a pristine llguidance matcher that `matcher()` copies (microseconds,
    where building one from the grammar text costs about a millisecond or far more for big schemas)."""

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher, stop_ids: frozenset[int], words: int):
        self.spec, self._template, self.stop_ids, self.words = spec, template, stop_ids, words
        self.warnings: list[str] = template.get_grammar_warnings()

    def matcher(self) -> "Matcher":
        """A fresh matcher at the start of the output."""
        return Matcher(self, self._template.deep_copy())


class Matcher:
    """One request's position in its grammar: `fill` the next token's mask, then `accept` the sampled token."""

    def __init__(self, grammar: Grammar, ll: llguidance.LLMatcher):
        self.grammar, self._ll = grammar, ll
        self._done = False

    @property
    def done(self) -> bool:
        """A stop token was accepted: the output is over (the engine stops on it too, even where a grammar uses a
        stop token as a delimiter)."""
        return self._done

    @property
    def accepting(self) -> bool:
        """The output so far is complete (a stop token is allowed now)."""
        return self._ll.is_accepting()

    def accept(self, token_id: int) -> None:
        """Advance past the sampled `token_id`; GrammarError if the grammar does not allow it (an engine bug:
        the sampler should only pick tokens of the mask)."""
        token_id = int(token_id)
        if self._done:
            raise GrammarError(f"token {token_id} after the grammar's output was complete")
        if not self._ll.consume_token(token_id):
            raise GrammarError(f"token {token_id} not allowed by the grammar: {_error_text(self._ll.get_error())}")
        self._done = token_id in self.grammar.stop_ids

    def fill(self, bitmask_row: np.ndarray) -> None:
        """Write the allowed next tokens into one mask row (int32, ``bitmask_words(V)`` words, contiguous)."""
        row = bitmask_row
        if row.dtype != np.int32 or row.shape != (self.grammar.words,) or not row.flags["C_CONTIGUOUS"]:
            raise ValueError(f"mask row must be contiguous int32 of shape ({self.grammar.words},), "
                             f"got {row.dtype} {row.shape}")
        self._ll.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer and model vocabulary (an LRU cache of `Grammar`s by spec) and
    fills the masks of a step's matchers in parallel on llguidance's thread pool (which releases the GIL).

    stop_token_ids: the tokens that end a complete output (default: the tokenizer's eos_token_ids).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, *, max_workers: int = 4, cache_size: int = 256,
                 stop_token_ids: Iterable[int] | None = None):
        stops = tokenizer.eos_token_ids if stop_token_ids is None else stop_token_ids
        self.vocab_size, self.words = vocab_size, bitmask_words(vocab_size)
        self.ll_tokenizer = ll_tokenizer(tokenizer, vocab_size, stops)
        self.stop_ids = frozenset(self.ll_tokenizer.eos_tokens)
        self._specials = special_tokens(tokenizer)
        self._executor = llguidance.LLExecutor(max_workers)
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar of `spec` (cached); GrammarError if it cannot be compiled."""
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
                return grammar
        grammar = self._build(spec)
        with self._lock:
            grammar = self._cache.setdefault(spec, grammar)  # a concurrent compile of the same spec wins
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, spec: GrammarSpec) -> Grammar:
        if not isinstance(spec, GrammarSpec):
            raise TypeError(f"expected a GrammarSpec, got {type(spec).__name__}")
        try:
            text = grammar_text(spec, self._specials)
        except ValueError as e:  # llguidance rejects malformed JSON text; GrammarError is a ValueError too
            raise GrammarError(f"invalid {spec.kind}: {e}") from None
        template = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(f"invalid {spec.kind}: {_error_text(template.get_error())}")
        return Grammar(spec, template, self.stop_ids, self.words)

    def matcher(self, spec: GrammarSpec) -> Matcher:
        """A fresh matcher for one request."""
        return self.compile(spec).matcher()

    def allocate(self, rows: int) -> np.ndarray:
        """A [rows, words] int32 mask, all tokens allowed (ids past V set too, harmless)."""
        return np.full((rows, self.words), -1, np.int32)

    def fill(self, matchers: Sequence[Matcher], bitmask: np.ndarray, rows: Sequence[int]) -> None:
        """Fill ``bitmask[rows[i]]`` with the mask of ``matchers[i]``, in parallel; other rows are untouched.

        bitmask: [n, words] int32; a strided view (e.g. ``masks[:, 0]`` of [n, 2, words]) is filled through a
        contiguous scratch buffer."""
        if len(matchers) != len(rows):
            raise ValueError(f"{len(matchers)} matchers for {len(rows)} rows")
        if not matchers:
            return
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or bitmask.shape[1] != self.words:
            raise ValueError(f"bitmask must be int32 [n, {self.words}], got {bitmask.dtype} {bitmask.shape}")
        rows = [int(r) for r in rows]
        if len(set(rows)) != len(rows) or not all(0 <= r < bitmask.shape[0] for r in rows):
            raise ValueError(f"rows must be distinct and in [0, {bitmask.shape[0]}): {rows}")
        if bitmask.flags["C_CONTIGUOUS"]:
            self._fill_into(matchers, bitmask, rows)
        else:
            scratch = np.empty((len(rows), self.words), np.int32)
            self._fill_into(matchers, scratch, list(range(len(rows))))
            bitmask[rows] = scratch

    def _fill_into(self, matchers: Sequence[Matcher], bitmask: np.ndarray, rows: list[int]) -> None:
        pairs = [(m._ll, r) for m, r in zip(matchers, rows)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, self.words * 4, bitmask.shape[0])
