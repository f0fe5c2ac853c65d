"""Compiling specs for one tokenizer (within `GrammarLimits`), per-request matchers, and filling token masks in
parallel.

Mask layout (llguidance's): one int32 row of ``bitmask_words(V)`` words per constrained request; bit ``i % 32`` of
word ``i // 32`` set = token i allowed.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Iterable, Sequence

import llguidance
import numpy as np

from serving.grammar.cache import GrammarCache
from serving.grammar.limits import (MiB, GrammarLimits, allocated_bytes, explain, release_free_memory,
                                    text_estimate)
from serving.grammar.sources import grammar_text
from serving.grammar.spec import GrammarError, GrammarSpec
from serving.grammar.vocab import ll_tokenizer, special_tokens

log = logging.getLogger(__name__)

BUILD_THREADS = 2  # grammars compiled at once: a slow build (seconds at most, see GrammarLimits) blocks no other


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one mask row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + 31) // 32


class Grammar:
    """A spec compiled for one tokenizer: a pristine llguidance matcher that `matcher()` copies (microseconds,
    where building one from the grammar text costs about a millisecond or far more for big schemas), and
    `nbytes`, its estimated memory."""

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher, stop_ids: frozenset[int], words: int,
                 limits: GrammarLimits, nbytes: int):
        self.spec, self._template, self.stop_ids, self.words = spec, template, stop_ids, words
        self.limits, self.nbytes = limits, nbytes
        self.warnings: list[str] = template.get_grammar_warnings()

    def matcher(self) -> "Matcher":
        """A fresh matcher at the start of the output."""
        return Matcher(self, self._template.deep_copy())


class Matcher:
    """One request's position in its grammar: `fill` the next token's mask, then `accept` the sampled token."""

    def __init__(self, grammar: Grammar, ll: llguidance.LLMatcher):
        self.grammar, self._ll = grammar, ll
        self._done = False
        self._tokens = 0
        self._failure: str | None = None  # set when the grammar engine raised on this matcher's mask

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
        """Advance past the sampled `token_id`. GrammarError if the grammar does not allow it (an engine bug: the
        sampler only picks tokens of the mask), or if following the grammar broke one of its limits (a mask that
        failed allows only the stop tokens, so the request ends here, with the error)."""
        token_id = int(token_id)
        if self._done:
            raise GrammarError(f"token {token_id} after the grammar's output was complete")
        ll = self._ll  # in error, llguidance allows and accepts the stop tokens: the error must not end it well
        if self._failure is None and not ll.is_error() and ll.consume_token(token_id) and not ll.is_error():
            self._tokens += 1
            self._done = token_id in self.grammar.stop_ids
            return
        if self._failure is not None:
            message, limit = self._failure, True
        else:
            message, limit = explain(self._ll.get_error(), self.grammar.limits)
        if limit:
            raise GrammarError(f"the output constraint could not be followed past output token {self._tokens}: "
                               f"{message}")
        raise GrammarError(f"token {token_id} not allowed by the grammar: {message}")

    def fill(self, bitmask_row: np.ndarray) -> None:
        """Write the allowed next tokens into one mask row (int32, ``bitmask_words(V)`` words, contiguous)."""
        row = bitmask_row
        if row.dtype != np.int32 or row.shape != (self.grammar.words,) or not row.flags["C_CONTIGUOUS"]:
            raise ValueError(f"mask row must be contiguous int32 of shape ({self.grammar.words},), "
                             f"got {row.dtype} {row.shape}")
        self._ll.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)


def _not_on_event_loop() -> None:
    """Compiling blocks for up to the compile timeout: never on an asyncio event loop's thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("GrammarCompiler.compile blocks: call it from a worker thread, not the event loop")


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer and model vocabulary within `limits`, caches the compiled
    `Grammar`s (least recently used out, bounded by their estimated bytes), and fills the masks of a step's
    matchers in parallel on llguidance's thread pool (which releases the GIL).

    Compiling runs on `BUILD_THREADS` threads of its own (so compiling takes at most that many cores), never on
    the caller's: the caller waits at most ``limits.compile_timeout`` seconds. A grammar's memory is the
    allocator's growth over its build; a reading taken while another build ran may count that one's too, so it
    then sizes the cache entry but refuses nothing.

    stop_token_ids: the tokens that end a complete output (default: the tokenizer's eos_token_ids).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, *, max_workers: int = 4, limits: GrammarLimits | None = None,
                 stop_token_ids: Iterable[int] | None = None):
        stops = tokenizer.eos_token_ids if stop_token_ids is None else stop_token_ids
        self.vocab_size, self.words = vocab_size, bitmask_words(vocab_size)
        self.limits = limits or GrammarLimits()
        self.ll_tokenizer = ll_tokenizer(tokenizer, vocab_size, stops)
        self.stop_ids = frozenset(self.ll_tokenizer.eos_tokens)
        self._stop_row = np.zeros(self.words, np.int32)
        for i in self.stop_ids:
            self._stop_row.view(np.uint32)[i // 32] |= np.uint32(1 << (i % 32))
        self._specials = special_tokens(tokenizer)
        self._parser_limits = self.limits.parser_limits()
        self._executor = llguidance.LLExecutor(max_workers)
        self._builder = ThreadPoolExecutor(BUILD_THREADS, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._building = self._builds = 0  # builds running now, and started so far (for the memory readings)
        self.cache = GrammarCache(self.limits.cache_memory)

    @property
    def compiling(self) -> int:
        """Grammars being built now (a build that outlived its request's timeout included)."""
        return self._building

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar of `spec` (cached); GrammarError if it cannot be compiled within the limits."""
        if not isinstance(spec, GrammarSpec):
            raise TypeError(f"expected a GrammarSpec, got {type(spec).__name__}")
        grammar = self.cache.get(spec)
        if grammar is not None:
            return grammar
        _not_on_event_loop()
        size, limit = len(spec.value.encode("utf-8", "surrogatepass")), self.limits.max_bytes
        if size > limit:
            raise GrammarError(f"{spec.kind}: {size:,} bytes, more than the limit of {limit:,} bytes")
        future = self._builder.submit(self._build_cached, spec)
        try:
            return future.result(timeout=self.limits.compile_timeout)
        except FutureTimeout:
            future.cancel()  # still queued: never built; running: finishes in the background (cached if it fits)
            raise GrammarError(f"{spec.kind}: compiling it took longer than the limit of "
                               f"{self.limits.compile_timeout:g} s (it is too large or complex, or the server is "
                               f"busy compiling other constraints)") from None

    def _build_cached(self, spec: GrammarSpec) -> Grammar:
        grammar = self.cache.get(spec)  # built meanwhile (for a request queued before this one)
        if grammar is not None:
            return grammar
        try:
            grammar = self._build(spec)
        except GrammarError:
            release_free_memory()  # what the failed build allocated goes back to the system
            raise
        return self.cache.put(spec, grammar)

    def _build(self, spec: GrammarSpec) -> Grammar:
        try:
            text = grammar_text(spec, self._specials)
        except ValueError as e:  # llguidance rejects malformed JSON text; GrammarError is a ValueError too
            raise GrammarError(f"invalid {spec.kind}: {e}") from None
        with self._lock:
            alone = self._building == 0
            self._building += 1
            self._builds += 1
            mine = self._builds
        try:
            before = allocated_bytes()
            template = self._template(spec, text)
            after = allocated_bytes()
        finally:
            with self._lock:
                self._building -= 1
                alone = alone and self._builds == mine
        measured = after - before if before is not None and after is not None else 0
        nbytes, most = max(text_estimate(text), measured), self.limits.max_grammar_memory
        if nbytes > most and alone:  # beside another build, the reading may hold that one's memory: not refused
            del template
            raise GrammarError(f"{spec.kind}: compiled, it needs about {nbytes / MiB:,.0f} MiB, more than the limit "
                               f"of {most / MiB:,.0f} MiB")
        return Grammar(spec, template, self.stop_ids, self.words, self.limits, nbytes)

    def _template(self, spec: GrammarSpec, text: str) -> llguidance.LLMatcher:
        """The llguidance matcher of `text`, its first mask computed and its first token tried (on a copy): a
        grammar that breaks a limit there is refused now rather than failing its request's first token."""
        template = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0, limits=self._parser_limits)
        error = self._error(spec, template)
        if error is None:
            row = np.zeros(self.words, np.int32)
            template.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            error = self._error(spec, template) or self._try_first_token(spec, template, row)
        if error is not None:
            del template  # freed now, not kept alive by the exception's traceback
            raise GrammarError(error)
        return template

    def _try_first_token(self, spec: GrammarSpec, template: llguidance.LLMatcher, row: np.ndarray) -> str | None:
        """Consume the first allowed token (other than a stop token) on a copy and compute the next mask."""
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:self.vocab_size])
        first = next((int(t) for t in allowed if int(t) not in self.stop_ids), None)
        if first is None:
            return None
        probe = template.deep_copy()
        if probe.consume_token(first):
            probe.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        return self._error(spec, probe)

    def _error(self, spec: GrammarSpec, ll: llguidance.LLMatcher) -> str | None:
        """The client's message if `ll` is in error (a limit, or an invalid grammar), else None."""
        if not ll.is_error():
            return None
        message, limit = explain(ll.get_error(), self.limits)
        return f"{spec.kind}: {message}" if limit else f"invalid {spec.kind}: {message}"

    def matcher(self, spec: GrammarSpec) -> Matcher:
        """A fresh matcher for one request."""
        return self.compile(spec).matcher()

    def close(self) -> None:
        """Stop compiling: queued builds are dropped, running ones finish on their threads."""
        self._builder.shutdown(wait=False, cancel_futures=True)

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
        """A matcher whose grammar breaks a limit gets a mask of the stop tokens (llguidance's, or ours if it
        raised): its request ends at its next token with the error; the other rows are filled as usual."""
        pairs = [(m._ll, r) for m, r in zip(matchers, rows)]
        try:
            self._executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, self.words * 4, bitmask.shape[0])
        except Exception:
            log.exception("filling %d grammar masks failed; filling them one by one", len(pairs))
            for m, r in zip(matchers, rows):
                try:
                    m.fill(bitmask[r])
                except Exception as e:
                    m._failure = f"the grammar engine failed ({type(e).__name__})"
                    bitmask[r] = self._stop_row
