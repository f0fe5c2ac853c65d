"""What one output constraint may cost: `GrammarLimits`, the clean messages of a constraint that breaks them, and
the allocator readings the compiler estimates a grammar's memory with.

A constraint is refused (GrammarError, a 400) when its text is longer than ``max_bytes``, when compiling it takes
longer than ``compile_timeout`` seconds, when llguidance's parser limits (`LLParserLimits`: grammar symbols,
lexer fuel and states, Earley items) stop it while it is built or while its first token is tried, or when it
needs more than ``max_grammar_memory`` bytes (as measured when no other build ran beside it). During generation
the per-step limits (``step_lexer_fuel``, ``step_max_items``; about 15 ms of one core at most per step) stop a
mask computation that would take longer: that request alone then ends with an error.

Memory is read from glibc's allocator (``mallinfo2``: bytes in use, llguidance's Rust code allocates through it):
the growth over a grammar's compilation is its estimated size. Without glibc the estimate is
`text_estimate` of the grammar text alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass

import llguidance

MiB = 1 << 20
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class GrammarLimits:
    """Limits on compiling and following one output constraint (defaults: ``python -m serving``'s).

    max_bytes: the constraint's text (schema, regex, grammar, tool list; UTF-8 bytes), checked before anything
        is compiled; llguidance's build time grows faster than linearly with it (a 50,000-way alternation,
        450 KB, takes ~8 s).
    compile_timeout: seconds a request waits for its constraint to compile (the build and its first token).
        A build that outlives it goes on in the background and is cached if it passes every other limit, so a
        retry finds it; its request is answered 400 at once.
    cache_memory: estimated bytes of the compiled-grammar cache (least recently used evicted first); a grammar
        needing more than a quarter of it (``max_grammar_memory``) is refused.
    The rest are llguidance's `LLParserLimits`: its defaults, except ``max_grammar_size``,
    ``initial_lexer_fuel`` and ``max_lexer_states``, lowered from 500,000, 1,000,000 and 250,000 (a list of 128
    tools with a dozen parameters each needs ~55,000 symbols and ~220,000 fuel; a schema of 1,000 properties
    ~300,000 fuel).
    """

    max_bytes: int = 256 * 1024
    compile_timeout: float = 1.0
    cache_memory: int = 256 * MiB
    max_grammar_size: int = 200_000      # symbols of the grammar's productions
    initial_lexer_fuel: int = 500_000    # building the lexer, and its first steps (~0.5 s)
    step_lexer_fuel: int = 200_000       # one mask's lexer work (~14 ms at most)
    step_max_items: int = 50_000         # one mask's Earley items (~2.5 ms at most)
    max_items_in_row: int = 2_000        # alternatives open at one point of the output
    max_lexer_states: int = 50_000       # lexer states, ~1-2 KB each

    def __post_init__(self):
        if self.max_bytes < 1 or self.cache_memory < 1 or not self.compile_timeout > 0:
            raise ValueError(f"grammar limits must be positive: {self}")

    @property
    def max_grammar_memory(self) -> int:
        """The most (estimated) bytes one compiled grammar may need."""
        return self.cache_memory // 4

    def parser_limits(self) -> llguidance.LLParserLimits:
        """llguidance's limits, with terse errors (no parser state or grammar in the messages)."""
        return llguidance.LLParserLimits(
            max_items_in_row=self.max_items_in_row, initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel, step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states, max_grammar_size=self.max_grammar_size, verbose_errors=False)


# llguidance's messages for its limits -> what the client is told (`{}`: the limit's value)
_LIMIT_MESSAGES = [
    ("grammar size (number of symbols) too big", "max_grammar_size",
     "it is too large (more than {} grammar symbols)"),
    ("initial lexer configuration (grammar) too big", "initial_lexer_fuel",
     "its tokens and regular expressions are too many or too complex to compile"),
    ("fuel exhausted", "initial_lexer_fuel",
     "its tokens and regular expressions are too many or too complex to compile"),
    ("too many expressions constructed", "step_lexer_fuel",
     "its regular expressions are too complex to follow within the grammar engine's per-token work limit"),
    ("too many states", "max_lexer_states", "its regular expressions need too many lexer states (more than {})"),
    ("Current row has", "max_items_in_row", "it has too many alternatives open at one point (more than {})"),
    ("Too many items", "step_max_items",
     "it is too ambiguous to follow within the grammar engine's per-token work limit ({} items)"),
]


def explain(error: str, limits: GrammarLimits) -> tuple[str, bool]:
    """(a client-facing message, whether a limit was hit) for an llguidance error: a limit is named in our
    words; an internal failure (a panic) is said as such, without its text; a grammar error keeps llguidance's
    message without its parser-state dump or backtrace, capped."""
    for needle, field, message in _LIMIT_MESSAGES:
        if needle in error:
            return message.format(f"{getattr(limits, field):,}"), True
    if "panic" in error or "<backtrace>" in error:
        return "the grammar engine cannot handle it (it is too large or complex)", True
    text = re.split(r"\n<(?:state|non-verbose/)>", error, maxsplit=1)[0].strip()
    text = text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."
    return text, False


def text_estimate(text: str) -> int:
    """Bytes a compiled grammar is assumed to need at least: 64 KiB plus 32 bytes per character of its llguidance
    text (measured: 26-43 for large JSON-schema and tool grammars, whose symbols and lexemes scale with it)."""
    return 64 * 1024 + 32 * len(text)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (>= 2.33): no readings, estimates from the text only
        return None


_LIBC = _libc()


def allocated_bytes() -> int | None:
    """Bytes the process has allocated through malloc (all arenas and mmapped blocks), or None without glibc."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def release_free_memory() -> None:
    """Give the allocator's free pages back to the system (after a large grammar failed or was dropped), so the
    process's resident memory goes down, not only its allocations."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
