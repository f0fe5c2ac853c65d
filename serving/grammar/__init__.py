"""Structured outputs: constrain a request's tokens to a JSON schema, a regex, a choice, a lark grammar or tool
calls, with llguidance.

The engine applies a grammar as a token mask inside its sampling step. Per decode step, for the constrained rows:
`GrammarCompiler.fill` writes each matcher's mask (int32 words, bit ``i % 32`` of word ``i // 32`` = token i
allowed) in parallel on llguidance's threads while the device runs the previous step; after sampling,
`Matcher.accept(token)`. A complete output allows only the stop tokens (the tokenizer's eos ids); ids the
tokenizer lacks (a model vocabulary padded past it) are never allowed.

    spec = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    compiler = GrammarCompiler(tokenizer, vocab_size)   # once per engine; limits=GrammarLimits(...)
    m = compiler.matcher(spec)                          # per request; GrammarError (a 400) if spec is invalid
                                                        # or breaks a limit (size, compile time, memory, ...)
    compiler.fill([m], masks, rows=[0]); ...; m.accept(token)

Modules: `spec` (what a request asks, hashable), `sources` (spec -> llguidance grammar text, JSON formatting
options), `vocab` (the tokenizer as llguidance sees it), `limits` (what a constraint may cost, clean error
messages), `cache` (compiled grammars, bounded in bytes), `compiler` (compiling, matchers, masks).
"""
from serving.grammar.compiler import Grammar, GrammarCompiler, Matcher, bitmask_words
from serving.grammar.limits import GrammarLimits
from serving.grammar.sources import JSON_OPTIONS
from serving.grammar.spec import GrammarError, GrammarSpec, strict_schema

__all__ = ["Grammar", "GrammarCompiler", "GrammarError", "GrammarLimits", "GrammarSpec", "JSON_OPTIONS",
           "Matcher", "bitmask_words", "strict_schema"]
