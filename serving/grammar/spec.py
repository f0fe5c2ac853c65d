"""What a request asks its output to follow: `GrammarSpec`, plus the OpenAI strict-mode schema rewrite.

A spec is plain, hashable data (a kind and a canonical text), independent of any tokenizer: the compiler turns it
into an llguidance grammar for its own tokenizer and caches the result by spec.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "lark", "tool_calls"]

# Keywords whose subschemas describe (parts of) the value itself, so strict mode applies inside them: one
# subschema / a list / a map of them. Conditional and negated subschemas (if/then/else, not, dependentSchemas)
# are partial constraints, where forbidding properties would change the meaning: they are left alone.
_ONE = ("items", "additionalProperties", "contains", "unevaluatedItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions")


class GrammarError(ValueError):
    """A spec the engine cannot compile (an invalid schema, regex, grammar or tool list); the message names what
    is wrong. The server answers it with a 400."""


def _canonical(value: Any) -> str:
    """Compact JSON text. Keys keep their order: llguidance generates object properties in schema order."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def strict_schema(schema: Any, *, _in_all_of: bool = False) -> Any:
    """A copy of `schema` with ``"additionalProperties": false`` on every object schema that lists ``properties``
    and does not say otherwise.

    OpenAI's strict mode only accepts schemas whose objects forbid additional properties (and list all properties
    in ``required``); llguidance follows JSON Schema, where additional properties are allowed unless forbidden, so
    a strict request gets the forbidding written in. Left as they are: objects that already set
    ``additionalProperties`` (or use ``patternProperties``/``unevaluatedProperties``); free-form objects without
    ``properties`` (``{"type": "object"}`` stays any object); schemas combined with ``allOf`` and its branches
    (forbidding there would reject the other branches' properties); ``$ref`` nodes (their targets are rewritten
    where defined); ``not``/``if``/``then``/``else`` subschemas. ``required`` is not changed: an optional property
    stays optional (OpenAI would reject such a schema; here it is honoured as written).
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ONE:
            out[key] = strict_schema(value)
        elif key in _LIST and isinstance(value, list):
            out[key] = [strict_schema(s, _in_all_of=key == "allOf") for s in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: strict_schema(s) for name, s in value.items()}
        else:
            out[key] = value
    kind = schema.get("type")
    is_object = "properties" in schema and (kind is None or kind == "object" or (
        isinstance(kind, list) and "object" in kind))
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")
    if is_object and not _in_all_of and not any(k in schema for k in open_keys):
        out["additionalProperties"] = False
    return out


def _function_schema(tool: Any, index: int) -> tuple[str, dict[str, Any]]:
    """(name, arguments schema) of one OpenAI tool definition; strict functions get `strict_schema`."""
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise GrammarError(f"{where}: only tools of type 'function' are supported")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise GrammarError(f"{where}: a function tool needs function.name (a non-empty string)")
    params = fn.get("parameters")
    if params is None:  # OpenAI: omitting parameters defines a function without arguments
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    if not isinstance(params, dict):
        raise GrammarError(f"{where}: function.parameters must be a JSON schema object")
    return fn["name"], strict_schema(params) if fn.get("strict") else params


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a request's output: `kind` and `value`, the schema as canonical JSON text, the regex, the
    lark source, the JSON list of choices or the tool-call spec as JSON. Hashable; build with the constructors."""

    kind: GrammarKind
    value: str

    @staticmethod
    def json_object() -> "GrammarSpec":
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return GrammarSpec("json_object", _canonical({"type": "object"}))

    @staticmethod
    def json_schema(schema: dict[str, Any], strict: bool = True) -> "GrammarSpec":
        """A JSON value valid for `schema`; `strict` forbids undeclared object properties (see `strict_schema`).

        A top-level ``"x-guidance"`` key in the schema overrides the engine's JSON formatting options."""
        if not isinstance(schema, dict):
            raise GrammarError(f"json_schema: the schema must be a JSON object, got {type(schema).__name__}")
        return GrammarSpec("json_schema", _canonical(strict_schema(schema) if strict else schema))

    @staticmethod
    def regex(pattern: str) -> "GrammarSpec":
        """Text matching `pattern` as a whole: Rust regex syntax (llguidance's; no lookarounds or backreferences),
        with ``\\d`` and ``\\w`` ASCII-only."""
        if not isinstance(pattern, str):
            raise GrammarError("regex: the pattern must be a string")
        return GrammarSpec("regex", pattern)

    @staticmethod
    def choice(options: list[str]) -> "GrammarSpec":
        """Exactly one of `options`."""
        if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) for o in options):
            raise GrammarError("choice: the options must be a non-empty list of strings")
        return GrammarSpec("choice", _canonical(list(options)))

    @staticmethod
    def lark(source: str) -> "GrammarSpec":
        """An llguidance lark grammar (``start`` rule; ``%json {...}`` and ``<special>`` tokens allowed)."""
        if not isinstance(source, str):
            raise GrammarError("lark: the grammar must be a string")
        return GrammarSpec("lark", source)

    @staticmethod
    def tool_calls(tools: list[dict[str, Any]], *, begin: str, end: str, list_form: bool,
                   only: str | None = None) -> "GrammarSpec":
        """One or more calls of the given OpenAI function tools, each ``{"name": ..., "arguments": {...}}`` with
        arguments valid for that function's parameters.

        list_form=True: ``begin`` + a JSON array of the calls + ``end``; otherwise each call is its own block
        ``begin`` + call + ``end``, blocks separated by ``"\\n"`` (Hermes style). ``only=name``: exactly one call,
        of that function. Parts of `begin`/`end` that spell a special token of the tokenizer must be produced as
        that token."""
        if not isinstance(tools, (list, tuple)) or not tools:
            raise GrammarError("tool_calls: tools must be a non-empty list")
        if not isinstance(begin, str) or not isinstance(end, str):
            raise GrammarError("tool_calls: begin and end must be strings")
        functions = [_function_schema(t, i) for i, t in enumerate(tools)]
        names = [name for name, _ in functions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise GrammarError(f"tool_calls: duplicate function names {duplicates}")
        if only is not None and only not in names:
            raise GrammarError(f"tool_calls: tool_choice names function {only!r}, which is not among the tools")
        spec = {"tools": [{"name": n, "parameters": p} for n, p in functions], "begin": begin, "end": end,
                "list_form": bool(list_form), "only": only}
        return GrammarSpec("tool_calls", _canonical(spec))
