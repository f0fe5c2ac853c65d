"""Chat templates, rendered the way ``transformers`` renders them (sandboxed jinja2, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a non-HTML-escaping ``tojson``, the special token strings
as variables, ``tools``/``documents`` defaulting to ``None``), so a model's own template produces the same prompt
here as in ``transformers``; and the continuation of a committed conversation (``render_continuation``). The
tokenizers that carry the templates are serving/tokenizer.py.

Prefix stability (what the conversation cache relies on)
--------------------------------------------------------
The engine keeps the model state of a conversation after each turn; the state covers the *committed*
token ids = prompt ids + generated ids (the generated ids end with the end/eos token). On the next
turn it only wants to feed the ids of the new messages. That is exact iff, for the chat template,

    render(messages[:k], add_generation_prompt=False) + render_rest == render(messages)

i.e. rendering the first k messages and then appending the rendering of the rest gives the same text
(and, since the split falls after an end-of-turn token, the same token ids) as rendering everything.
``render_continuation`` checks this on the rendered *text* and returns the token ids of the suffix, or
``None`` when the template is not prefix-stable for these messages (e.g. templates that rewrite
earlier turns, such as stripping reasoning from old assistant messages); the caller must then fall back
to a full recompute. The byte template is prefix-stable by construction: the committed assistant turn
``<|assistant|>answer<|end|>`` is exactly prompt ids + generated ids.

For templates that add text after the end-of-turn token (ChatML renders ``<|im_end|>\\n``, but the model
stops generating at ``<|im_end|>``), pass ``committed_ids``: the prefix is then the decoded committed ids,
so the suffix starts with the missing ``\\n`` and committed ids + continuation equals a full render.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["compile_chat_template", "render_chat_template", "select_template", "parse_chat_template",
           "render_continuation"]

# Names a message's reasoning may be passed under; transformers copies it to the first (and to "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# --------------------------------------------------------------------------------------------------
# Chat template machinery
# --------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' ``{% generation %}...{% endgeneration %}`` tag and renders its body as is.

    transformers uses the tag to build assistant-token masks for training; for serving only the text
    matters, but templates containing the tag must still compile.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Same as transformers: jinja's built-in tojson HTML-escapes and sorts keys, which templates don't expect.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandboxed environment configured like transformers'.

    Cached because the same template is rendered for every request. Templates come from model repos
    (untrusted), hence the immutable sandbox.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages the way transformers does before rendering.

    Keys whose value is None are dropped (OpenAI clients send ``content=None`` next to tool calls and
    many templates only handle a missing key), reasoning given under an alternative name is also
    exposed as ``reasoning_content`` / ``thinking``, and tool calls' ``arguments`` given as JSON text (as
    OpenAI sends them) become objects (as chat templates expect them).
    """
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        msg = {k: v for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        if isinstance(msg.get("tool_calls"), list):
            msg["tool_calls"] = [_call_with_object_arguments(c) for c in msg["tool_calls"]]
        out.append(msg)
    return out


def _call_with_object_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}}


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``template`` for ``messages``; ``kwargs`` become template variables (they override
    the special token strings, as in transformers)."""
    variables = {**(special_tokens or {}), **kwargs}
    # transformers always defines these two, so templates testing ``tools is none`` behave the same.
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return compile_chat_template(template).render(
        messages=_normalize_messages(messages), add_generation_prompt=add_generation_prompt, **variables
    )


def select_template(
    chat_template: str | Mapping[str, str] | None, override: str | None = None, tools: Any = None
) -> str:
    """Pick the template source: an explicit override (a name or a template), else "tool_use" when
    tools are given and present, else "default" — mirroring transformers' ``get_chat_template``."""
    if isinstance(chat_template, Mapping):
        if override is not None:
            return chat_template.get(override, override)
        if tools is not None and "tool_use" in chat_template:
            return chat_template["tool_use"]
        if "default" in chat_template:
            return chat_template["default"]
        raise ValueError(f"multiple chat templates and none named 'default': {sorted(chat_template)}")
    if override is not None:
        return override
    if chat_template is None:
        raise ValueError("this tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    return chat_template


def parse_chat_template(value: Any) -> str | dict[str, str] | None:
    """tokenizer_config.json stores either a string or a list of ``{"name", "template"}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return {entry["name"]: entry["template"] for entry in value}
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f"unsupported chat_template value of type {type(value).__name__}")



# --------------------------------------------------------------------------------------------------
# Conversation continuation
# --------------------------------------------------------------------------------------------------


def render_continuation(
    tokenizer: Any,
    committed_messages: Sequence[Mapping[str, Any]],
    new_messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    committed_ids: Sequence[int] | None = None,
    **template_kwargs: Any,
) -> list[int] | None:
    """Token ids that extend an already-committed conversation by ``new_messages`` (``tokenizer``: a
    serving.tokenizer.BaseTokenizer).

    ``committed_messages`` must include the assistant answer as committed. The full conversation is
    rendered (with ``add_generation_prompt``); the prefix is the rendering of ``committed_messages``
    without generation prompt, or, when ``committed_ids`` is given, those ids decoded with special
    tokens (what the model actually consumed). If the full rendering starts with the prefix, the suffix
    is encoded and returned; otherwise ``None``: the template is not prefix-stable here and the caller
    must recompute the whole conversation. See the module docstring.
    """
    full_text = tokenizer.apply_chat_template(
        [*committed_messages, *new_messages], add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    if committed_ids is not None:
        prefix_text = tokenizer.decode(committed_ids, skip_special_tokens=False)
    elif committed_messages:
        prefix_text = tokenizer.apply_chat_template(
            committed_messages, add_generation_prompt=False, **template_kwargs
        )
    else:
        prefix_text = ""  # nothing committed (and some templates cannot render an empty conversation)
    if not full_text.startswith(prefix_text):
        return None
    return tokenizer.encode(full_text[len(prefix_text) :], add_special_tokens=False)
