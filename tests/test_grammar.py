"""Tests for serving.grammar (structured outputs with llguidance), without a model: random walks.

A walk starts a matcher per spec, fills its mask, picks a random allowed token (non-stop tokens while under a length
budget; past it stop tokens, then closing tokens such as ``"``/``}``/``]``, so walks end), accepts it, and stops at
a stop token; the decoded output must then satisfy the spec (schemas checked with `jsonschema`). Walks run in
batches through `GrammarCompiler.fill` on a strided view, as the engine fills ``masks[:, 0]``. The mean mask fill
time per token is printed (``pytest -s``), not asserted.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
import time

import jsonschema
import numpy as np
import pytest

from serving.grammar import GrammarCompiler, GrammarError, GrammarSpec, bitmask_words, strict_schema
from serving.tokenizer import ByteTokenizer, Tokenizer

BUDGET = 48  # output bytes of free random choice before a walk heads for its end
MAX_STEPS = 4000


# ---------------------------------------------------------------------------------------------- the random walk


def allowed_ids(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids whose bit is set in one mask row."""
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


class Walker:
    """Random walks over one compiler; records the fill time per token and checks masks never allow ids the
    tokenizer lacks."""

    def __init__(self, compiler: GrammarCompiler, token_bytes: list[bytes], tokenizer_size: int):
        self.c, self.tokenizer_size = compiler, tokenizer_size
        self.stops = np.array(sorted(compiler.stop_ids))
        self.lengths = [len(b) for b in token_bytes] + [0] * (compiler.vocab_size - len(token_bytes))
        self.closers = np.array([i for i, b in enumerate(token_bytes) if b and set(b) <= set(b'"}]')])
        self.fill_seconds, self.fill_tokens = 0.0, 0

    def _pick(self, ids: np.ndarray, used: int, rng: np.random.Generator) -> int:
        stops = np.intersect1d(ids, self.stops)
        if used >= BUDGET:
            closers = np.intersect1d(ids, self.closers)
            for preferred in (stops, closers):
                if len(preferred):
                    return int(rng.choice(preferred))
        others = np.setdiff1d(ids, self.stops)
        return int(rng.choice(others if len(others) else ids))

    def run(self, specs: list[GrammarSpec], seed: int) -> list[list[int]]:
        """Walk all specs side by side (one batch row each); the generated ids of each, ending in a stop id."""
        rng = np.random.default_rng(seed)
        matchers = [self.c.matcher(s) for s in specs]
        out: list[list[int]] = [[] for _ in specs]
        used = [0] * len(specs)
        masks = np.zeros((len(specs) + 1, 2, self.c.words), np.int32)  # row 0 unconstrained, as in the engine
        for _ in range(MAX_STEPS):
            live = [i for i, m in enumerate(matchers) if not m.done]
            if not live:
                return out
            masks[:, 0] = -1
            t0 = time.perf_counter()
            self.c.fill([matchers[i] for i in live], masks[:, 0], [i + 1 for i in live])
            self.fill_seconds += time.perf_counter() - t0
            self.fill_tokens += len(live)
            assert (masks[0, 0] == -1).all() and (masks[:, 1] == 0).all()  # other rows / planes untouched
            for i in live:
                ids = allowed_ids(masks[i + 1, 0], self.c.vocab_size)
                assert len(ids) and ids.max() < self.tokenizer_size, ids
                token = self._pick(ids, used[i], rng)
                matchers[i].accept(token)
                out[i].append(token)
                used[i] += self.lengths[token]
        raise AssertionError(f"walks did not end in {MAX_STEPS} steps")

    def report(self, label: str) -> None:
        mean_us = 1e6 * self.fill_seconds / max(self.fill_tokens, 1)
        print(f"\n[grammar] {label}: mean mask fill {mean_us:.1f} us/token over {self.fill_tokens} tokens "
              f"(V={self.c.vocab_size})")


def byte_text(ids: list[int]) -> str:
    """The UTF-8 text of a byte-tokenizer output (strict: the grammar must produce valid UTF-8)."""
    return bytes(i for i in ids if i < 256).decode("utf-8")


@pytest.fixture(scope="module")
def byte_walker():
    tok = ByteTokenizer()
    compiler = GrammarCompiler(tok, 300)  # a model vocabulary padded past the tokenizer's 264 ids
    walker = Walker(compiler, [bytes([i]) for i in range(256)] + [b""] * 44, tok.vocab_size)
    yield walker
    walker.report("byte tokenizer, all walks")


# ---------------------------------------------------------------------------------------------- specs and checks

PT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "active": {"type": "boolean"}}, "required": ["name", "age", "active"]},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
            "required": ["id", "tags"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["user"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"enum": ["red", "green", 3, None, {"k": [1]}]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                      "note": {"type": "string", "maxLength": 5}}, "required": ["code"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 20},
                                                      {"type": "string", "enum": ["x", "y"]}]}},
     "required": ["v"]},
    {"$defs": {"pt": PT}, "type": "object", "required": ["a", "b"],
     "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"type": "array", "items": {"$ref": "#/$defs/pt"},
                                                       "maxItems": 2}}},
    {"type": "object", "properties": {"ok": {"const": True}, "nothing": {"type": "null"},
                                      "flag": {"type": "boolean"}}, "required": ["ok", "nothing", "flag"]},
    {"type": "array", "prefixItems": [{"enum": ["a", "b"]}, {"type": "integer", "minimum": 0, "maximum": 9}],
     "items": False},
    {"type": "string", "minLength": 2, "maxLength": 4},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"]}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: an empty object
]
HERMES = dict(begin="<tool_call>\n", end="\n</tool_call>", list_form=False)
LISTED = dict(begin="[TOOL_CALLS]", end="", list_form=True)


def check_calls(calls: list, only: str | None = None) -> None:
    """Each call names a tool and its arguments validate against that tool's parameters."""
    params = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
              for t in TOOLS}
    assert calls
    for call in calls:
        assert list(call) == ["name", "arguments"]
        jsonschema.validate(call["arguments"], params[call["name"]])
        if call["name"] == "add":
            assert set(call["arguments"]) == {"x", "y"}  # strict function: nothing else
    if only is not None:
        assert len(calls) == 1 and calls[0]["name"] == only


def parse_hermes(text: str, begin: str, end: str) -> list:
    """The calls of Hermes-style output: blocks begin + JSON + end, separated by single newlines."""
    parts = re.findall(f"{re.escape(begin)}(.*?){re.escape(end)}", text, re.S)
    assert parts and "\n".join(begin + p + end for p in parts) == text, text
    return [json.loads(p) for p in parts]


# ---------------------------------------------------------------------------------------------- byte tokenizer


def test_json_schema_walks_validate(byte_walker):
    specs = [GrammarSpec.json_schema(s) for s in SCHEMAS]
    for seed in range(5):  # 50 walks
        for schema, spec, ids in zip(SCHEMAS, specs, byte_walker.run(specs, seed)):
            assert ids[-1] in byte_walker.c.stop_ids
            value = json.loads(byte_text(ids))
            jsonschema.validate(value, schema)
            jsonschema.validate(value, json.loads(spec.value))  # strict: no undeclared properties anywhere


def test_json_is_compact_ish(byte_walker):
    """Outside strings, whitespace is at most one space after ',' or ':'."""
    for ids in byte_walker.run([GrammarSpec.json_schema(SCHEMAS[1]), GrammarSpec.json_object()] * 4, seed=7):
        text = byte_text(ids)
        bare = re.sub(r'"(\\.|[^"\\])*"', '""', text)
        assert not re.search(r"\s", re.sub(r"[,:] ", "", bare)), text


def test_strict_forbids_extra_properties_non_strict_allows():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert json.loads(GrammarSpec.json_schema(schema).value)["additionalProperties"] is False
    assert "additionalProperties" not in json.loads(GrammarSpec.json_schema(schema, strict=False).value)
    c = GrammarCompiler(ByteTokenizer(), 264)
    loose = c.matcher(GrammarSpec.json_schema(schema, strict=False))
    for t in b'{"a":1,"zz":[true]}':
        loose.accept(t)
    strict = c.matcher(GrammarSpec.json_schema(schema))
    for t in b'{"a":1':
        strict.accept(t)
    with pytest.raises(GrammarError, match="not allowed"):
        strict.accept(ord(","))


def test_strict_schema_rewrite():
    """Strict mode forbids undeclared properties on every object that does not say otherwise, and only there."""
    obj = {"type": "object", "properties": {"a": {"type": "integer"}}}
    schema = {"type": "object", "properties": {
        "nested": obj, "list": {"type": "array", "items": obj}, "either": {"anyOf": [obj, {"type": "null"}]},
        "open": {**obj, "additionalProperties": True}, "map": {"type": "object", "additionalProperties": obj},
        "ref": {"$ref": "#/$defs/o"}, "mixed": {"allOf": [obj, {"properties": {"b": {}}}]},
        "negated": {"not": obj}, "free": {"type": "object"}}, "$defs": {"o": obj}}
    out = strict_schema(schema)
    props = out["properties"]
    assert out["additionalProperties"] is False and out["$defs"]["o"]["additionalProperties"] is False
    for path in (props["nested"], props["list"]["items"], props["either"]["anyOf"][0],
                 props["map"]["additionalProperties"]):
        assert path["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True and props["ref"] == {"$ref": "#/$defs/o"}
    assert props["mixed"] == schema["properties"]["mixed"] and props["negated"] == {"not": obj}
    assert props["free"] == {"type": "object"}  # a free-form object stays any object
    assert "additionalProperties" not in obj  # the input is not modified


def test_json_object(byte_walker):
    for ids in byte_walker.run([GrammarSpec.json_object()] * 8, seed=3):
        assert isinstance(json.loads(byte_text(ids)), dict)


@pytest.mark.parametrize("form", [HERMES, LISTED], ids=["hermes", "list"])
def test_tool_calls(byte_walker, form):
    specs = [GrammarSpec.tool_calls(TOOLS, **form)] * 6 + [GrammarSpec.tool_calls(TOOLS, **form, only="add")] * 3
    for k, ids in enumerate(byte_walker.run(specs, seed=11)):
        text = byte_text(ids)
        only = "add" if k >= 6 else None
        if form["list_form"]:
            assert text.startswith(form["begin"]) and text.endswith(form["end"]), text
            calls = json.loads(text[len(form["begin"]):len(text) - len(form["end"])])
        else:
            calls = parse_hermes(text, form["begin"], form["end"])
        check_calls(calls, only)


def test_tool_call_delimiter_special_token():
    """A delimiter spelling a special token of the tokenizer must be produced as that token."""
    c = GrammarCompiler(ByteTokenizer(), 264)
    m = c.matcher(GrammarSpec.tool_calls(TOOLS, begin="<|user|>", end="x<|system|>", list_form=True, only="now"))
    row = c.allocate(1)
    c.fill([m], row, [0])
    assert allowed_ids(row[0], 264).tolist() == [ByteTokenizer.SPECIAL_TOKENS["<|user|>"]]
    for t in [259, *b'[{"name":"now","arguments":{}}]x', 261]:
        m.accept(t)
    assert m.accepting and not m.done
    m.accept(258)
    assert m.done


def test_regex_and_choice_and_lark(byte_walker):
    regexes = [r"[0-9]{3}-[a-z]+", r"(yes|no)!?", r"[A-F0-9]{8}", r"\(\d+(,\d+)*\)"]
    options = ["yes", "no", "nope", 'quo"te', "new\nline", "héllo 🙂"]
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'
    specs = [GrammarSpec.regex(r) for r in regexes] + [GrammarSpec.choice(options)] * 6 + [GrammarSpec.lark(lark)]
    for seed in range(2):
        out = [byte_text(ids) for ids in byte_walker.run(specs, seed)]
        for regex, text in zip(regexes, out):
            assert re.fullmatch(regex, text) and text.isascii(), (regex, text)  # \d: ASCII digits only
        assert all(text in options for text in out[len(regexes):-1])
        assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", out[-1]), out[-1]
    empty = GrammarCompiler(ByteTokenizer(), 264).matcher(GrammarSpec.choice(["", "a"]))
    empty.accept(262)
    assert empty.done


@pytest.mark.parametrize("make, message", [
    (lambda: GrammarSpec.json_schema({"type": "strin"}), "Invalid type"),
    (lambda: GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
    (lambda: GrammarSpec.json_schema({"type": "string", "format": "no-such-format"}), "format"),
    (lambda: GrammarSpec.json_schema({"type": "string", "pattern": "a(b"}), "unclosed group"),
    (lambda: GrammarSpec.json_schema(["not", "an", "object"]), "JSON object"),
    (lambda: GrammarSpec.regex("a(b"), "unclosed group"),
    (lambda: GrammarSpec.lark("start: undefined_rule"), "undefined_rule"),
    (lambda: GrammarSpec.lark('start: "a" <|no_such_token|>'), "no_such_token"),
    (lambda: GrammarSpec.choice([]), "non-empty"),
    (lambda: GrammarSpec.tool_calls([], **HERMES), "non-empty"),
    (lambda: GrammarSpec.tool_calls([TOOLS[0], TOOLS[0]], **HERMES), "duplicate"),
    (lambda: GrammarSpec.tool_calls(TOOLS, **HERMES, only="nope"), "nope"),
    (lambda: GrammarSpec.tool_calls([{"type": "function", "function": {"name": "f", "parameters": 3}}], **HERMES),
     "parameters"),
    (lambda: GrammarSpec.tool_calls([{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}], **HERMES), "nope"),
])
def test_bad_specs_raise_grammar_error(make, message):
    c = GrammarCompiler(ByteTokenizer(), 264)
    with pytest.raises(GrammarError, match=re.escape(message)):
        c.compile(make())


def test_accept_guards_and_cache():
    c = GrammarCompiler(ByteTokenizer(), 264)
    spec = GrammarSpec.json_schema(SCHEMAS[0])
    assert c.compile(spec) is c.compile(GrammarSpec.json_schema(json.loads(json.dumps(SCHEMAS[0]))))
    assert c.compile(spec) is not c.compile(GrammarSpec.json_schema(SCHEMAS[0], strict=False))
    assert hash(spec) == hash(GrammarSpec.json_schema(SCHEMAS[0]))
    m = c.matcher(GrammarSpec.choice(["ab"]))
    with pytest.raises(GrammarError, match="not allowed"):
        m.accept(ord("b"))
    m = c.matcher(GrammarSpec.choice(["ab"]))
    for t in (*b"ab", 258):
        m.accept(t)
    with pytest.raises(GrammarError, match="complete"):
        m.accept(258)
    assert bitmask_words(264) == 9 and bitmask_words(256) == 8 and bitmask_words(257) == 9
    with pytest.raises(ValueError):
        c.fill([m], np.zeros((2, 8), np.int32), [0])


# ---------------------------------------------------------------------------------------------- a 32K HF tokenizer


def _train_32k():
    """A byte-level BPE tokenizer of 32,000 tokens trained in-process on the Python standard library's sources,
    with ChatML and Hermes tool-call special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue
        size += len(texts[-1])
        if size > 8_000_000:
            break
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=32000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials,
        show_progress=False))
    return tok


@pytest.fixture(scope="module")
def hf_walker():
    hf = _train_32k()
    tok = Tokenizer(hf, special_tokens={"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"})
    vocab = tok.vocab_size + 64  # padded model vocabulary
    compiler = GrammarCompiler(tok, vocab)
    token_bytes = [compiler.ll_tokenizer.decode_bytes([i]) for i in range(tok.vocab_size)]
    walker = Walker(compiler, token_bytes, tok.vocab_size)
    walker.tok = tok
    yield walker
    walker.report(f"HF BPE tokenizer ({tok.vocab_size} tokens), all walks")


def test_hf_tokenizer_json_and_tool_calls(hf_walker):
    tok = hf_walker.tok
    assert hf_walker.c.stop_ids == {tok.token_to_id("<|im_end|>")}
    specs = [GrammarSpec.json_schema(s) for s in SCHEMAS] + [GrammarSpec.tool_calls(TOOLS, **HERMES)] * 4
    out = hf_walker.run(specs, seed=5)
    for schema, ids in zip(SCHEMAS, out):
        jsonschema.validate(json.loads(tok.decode(ids)), schema)
    tool_call = tok.token_to_id("<tool_call>")
    for ids in out[len(SCHEMAS):]:
        assert ids[0] == tool_call  # the special token, not its spelling
        check_calls(parse_hermes(tok.decode(ids, skip_special_tokens=False).removesuffix("<|im_end|>"),
                                 **{k: HERMES[k] for k in ("begin", "end")}))
