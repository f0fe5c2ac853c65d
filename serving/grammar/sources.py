"""`GrammarSpec` -> llguidance grammar text (a JSON-schema grammar, a regex, or a lark grammar).

JSON is generated compact-ish: no whitespace except at most one space after ``,`` and ``:`` (so ``{"a":1}`` and
``{"a": 1, "b": 2}`` are both possible, pretty-printing is not): a weak model cannot wander in whitespace, and
the output parses the same. A schema's own top-level ``"x-guidance"`` options override these. Strings are bounded
only where the schema bounds them.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

import llguidance

from serving.grammar.spec import GrammarError, GrammarSpec

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}


def grammar_text(spec: GrammarSpec, specials: Mapping[str, int]) -> str:
    """The llguidance grammar for `spec`; `specials` maps the tokenizer's special-token strings to their ids
    (tool-call delimiters that spell one must be that token)."""
    if spec.kind in ("json_object", "json_schema"):
        return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_lark(regex_lark(spec.value))
    if spec.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(choice_lark(json.loads(spec.value)))
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    if spec.kind == "tool_calls":
        return llguidance.LLMatcher.grammar_from_lark(tool_calls_lark(json.loads(spec.value), specials))
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


def _literal(text: str) -> str:
    """A lark string literal for `text` (JSON escapes are valid lark escapes)."""
    return json.dumps(text, ensure_ascii=False)


def regex_lark(pattern: str) -> str:
    """``start: /pattern/`` with ``\\d``/``\\w`` meaning ASCII digits/word characters (as in JSON Schema
    patterns), not Unicode's hundreds of digits a model would never mean."""
    return f"start: /{llguidance.regex_to_lark(pattern, 'dw')}/"


def choice_lark(options: list[str]) -> str:
    """``start: CHOICE`` with ``CHOICE: "a" | "b" ...``, one terminal (one lexeme: thousands of options cost the
    parser one item, not one each); an empty option makes the whole choice optional."""
    alternatives = " | ".join(_literal(o) for o in dict.fromkeys(options) if o)
    if not alternatives:
        raise GrammarError("choice: all options are empty")
    return f"start: CHOICE{'?' if '' in options else ''}\nCHOICE: {alternatives}"


def delimiter_lark(text: str, specials: Mapping[str, int]) -> str:
    """Lark items spelling `text`: string literals, and ``<[id]>`` where a special token's string occurs."""
    if not text:
        return ""
    if not specials:
        return _literal(text)
    pattern = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    items = [f"<[{specials[piece]}]>" if i % 2 else _literal(piece)
             for i, piece in enumerate(pattern.split(text)) if piece]
    return " ".join(items)


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """``{"name": <this name>, "arguments": <its parameters>}``, in that order, nothing else."""
    return {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": tool["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_calls_lark(spec: dict[str, Any], specials: Mapping[str, int]) -> str:
    """The lark grammar of a tool_calls spec (see `GrammarSpec.tool_calls`)."""
    tools = spec["tools"]
    if spec["only"] is not None:
        tools = [t for t in tools if t["name"] == spec["only"]]
    calls = [_call_schema(t) for t in tools]
    one_call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    begin, end = delimiter_lark(spec["begin"], specials), delimiter_lark(spec["end"], specials)
    if spec["list_form"]:
        array = {"type": "array", "items": one_call, "minItems": 1}
        if spec["only"] is not None:
            array["maxItems"] = 1
        body = {**array, "x-guidance": JSON_OPTIONS}
        return f"start: {begin} calls {end}\ncalls: %json {json.dumps(body)}\n"
    body = {**one_call, "x-guidance": JSON_OPTIONS}
    start = "start: call" if spec["only"] is not None else 'start: call ("\\n" call)*'
    return f"{start}\ncall: {begin} body {end}\nbody: %json {json.dumps(body)}\n"
