"""Tool-call parsers: split a model's generated text (reasoning already split off) into content and OpenAI tool
calls, whole or streamed.

Formats (`--tool-call-parser` names as vLLM and NVIDIA's model cards spell them):
* `nemotron_json` (Nemotron-H, Nemotron Nano 2): `<TOOLCALL>[{"name": …, "arguments": {…}}, …]</TOOLCALL>`;
* `hermes` (Hermes, Qwen2.5/Qwen3) and `granite4` (IBM Granite 4.0): one or more
  `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>` blocks.

One parser instance per request. `parse(text)` splits a whole output; `feed(delta)` / `finish()` split it while it
streams. Both run the same state machine, and streaming holds back only text whose meaning is not yet known, so the
joined deltas always equal `parse` of the joined text, however the text was cut.

The rules:
* A block runs from its begin tag to the first end tag outside JSON strings and brackets (a tag quoted inside an
  argument does not end it). A block whose JSON is a call object (Nemotron: an array of them) gives the calls; a call
  object has a non-empty string "name" and an object "arguments" (absent: `{}`); other keys are ignored.
* Any other block stays in the content verbatim, tags and surrounding whitespace included. vLLM keeps a whole output
  as content when any block is malformed; here each block is judged alone, because a streamed call already sent
  cannot be taken back. An output with a single malformed block is thus all content, as in vLLM.
* A block still open when the output ends (no end tag) counts as if closed there, as vLLM does for `<tool_call>`.
* Whitespace next to call blocks is dropped, except the whitespace after a block that separates content before the
  calls from content after them: `"Sure.\\n<call>\\n<call>\\nDone.\\n"` has the content `"Sure.\\nDone.\\n"`.
* Streaming sends a call whole (`id`, `name` and `arguments` in one delta) when its block closes: only then is it
  known to be a call. `arguments` is the compact `json.dumps` of the parsed object, non-ASCII kept.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from serving.openai.parsers.reasoning import emit_len

__all__ = ["TOOL_CALL_PARSERS", "Granite4ToolCallParser", "HermesToolCallParser", "NemotronToolCallParser",
           "ToolCall", "ToolCallDelta", "ToolCallParser", "random_call_id"]


@dataclass(frozen=True)
class ToolCall:
    """A parsed call; `arguments` is JSON text, as OpenAI returns it."""

    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """One streamed piece of a call: OpenAI's `delta.tool_calls[i]` (id and name come with a call's first piece)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def random_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _call_of(obj: Any) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a call object, None if `obj` is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


class _BlockEnd:
    """Finds a block's end tag outside JSON strings and brackets, resuming where the previous look stopped."""

    def __init__(self, tag: str):
        self.tag, self.pos, self.depth, self.in_string, self.escaped = tag, 0, 0, False, False

    def find(self, body: str) -> int | None:
        """Index of the end tag in `body` (the block's text so far), None while it has not come."""
        while self.pos < len(body):
            if not self.in_string and self.depth <= 0:
                ahead = body[self.pos:self.pos + len(self.tag)]
                if ahead == self.tag:
                    return self.pos
                if len(ahead) < len(self.tag) and self.tag.startswith(ahead):
                    return None
            self._step(body[self.pos])
            self.pos += 1
        return None

    def _step(self, c: str) -> None:
        if self.in_string:
            self.escaped, self.in_string = (False, True) if self.escaped else (c == "\\", c != '"')
        elif c == '"':
            self.in_string = True
        elif c in "[{":
            self.depth += 1
        elif c in "]}":
            self.depth -= 1


@dataclass
class _Block:
    """An open tool-call block: the whitespace before its begin tag, and its text so far."""

    lead: str
    end: _BlockEnd
    body: str = ""


class ToolCallParser:
    """Splits content from tool-call blocks `begin` … `end` (see the module docstring).

    `list_form` (also read by the grammar that forces tool calls): True means one block holding a JSON array of call
    objects; False means one or more blocks of one call object each, separated by "\\n".
    """

    name: ClassVar[str]
    begin: ClassVar[str]
    end: ClassVar[str]
    list_form: ClassVar[bool]

    def __init__(self, id_factory: Callable[[], str] | None = None):
        self._id_factory = id_factory or random_call_id
        self._buf = ""  # text outside blocks, not yet emitted
        self._block: _Block | None = None
        self._after_call = False  # a call block closed, and no text but whitespace came since
        self._content_seen = False  # some content was emitted
        self._calls = 0

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole output; independent of this instance's streaming state."""
        whole = type(self)(self._id_factory)
        content, deltas = whole.feed(text)
        more_content, more_deltas = whole.finish()
        return content + more_content, [ToolCall(d.id, d.name, d.arguments) for d in deltas + more_deltas]

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """(content delta, call deltas) for the next piece of streamed output."""
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """(content delta, call deltas) still held back when the output ends."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        progressed = True
        while progressed:
            progressed = self._inside(content, calls, final) if self._block else self._outside(content, final)
        return "".join(content), calls

    def _outside(self, content: list[str], final: bool) -> bool:
        """Emit the content before the next begin tag; True when a block opened."""
        if self._after_call:
            rest = self._buf.lstrip()
            if not rest:  # wait for more, or drop it at the output's end
                if final:
                    self._buf = ""
                return False
            self._buf = self._buf if self._content_seen else rest
            self._after_call = False
        start = self._buf.find(self.begin)
        if start < 0:
            n = len(self._buf) if final else emit_len(self._buf, self.begin)
            self._emit(content, self._buf[:n])
            self._buf = self._buf[n:]
            return False
        before = self._buf[:start]
        self._emit(content, before.rstrip())
        self._block = _Block(lead=before[len(before.rstrip()):], end=_BlockEnd(self.end))
        self._buf = self._buf[start + len(self.begin):]
        return True

    def _inside(self, content: list[str], calls: list[ToolCallDelta], final: bool) -> bool:
        """Grow the open block; close it at its end tag (or at the output's end). True when it closed."""
        block = self._block
        block.body += self._buf
        self._buf = ""
        stop = block.end.find(block.body)
        if stop is None and not final:
            return False
        body, self._buf = (block.body, "") if stop is None else (block.body[:stop], block.body[stop + len(self.end):])
        self._block = None
        found = self._calls_in(body)
        if found is None:
            self._emit(content, block.lead + self.begin + body + ("" if stop is None else self.end))
            return True
        for name, arguments in found:
            calls.append(ToolCallDelta(self._calls, self._id_factory(), name, arguments))
            self._calls += 1
        self._after_call = True
        return True

    def _emit(self, content: list[str], text: str) -> None:
        if text:
            content.append(text)
            self._content_seen = True

    def _calls_in(self, body: str) -> list[tuple[str, str]] | None:
        """The (name, arguments) calls a block's text holds, None if it is not a well-formed call block."""
        try:
            value = json.loads(body)
        except ValueError:
            return None
        objs = value if self.list_form else [value]
        if not isinstance(objs, list):
            return None
        calls = [_call_of(obj) for obj in objs]
        return None if None in calls else calls


class NemotronToolCallParser(ToolCallParser):
    """Nemotron-H / Nemotron Nano 2: `<TOOLCALL>[call, …]</TOOLCALL>` (NVIDIA's vLLM plugin name `nemotron_json`)."""

    name = "nemotron_json"
    begin, end, list_form = "<TOOLCALL>", "</TOOLCALL>", True


class HermesToolCallParser(ToolCallParser):
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\ncall\\n</tool_call>` blocks (vLLM's `hermes`)."""

    name = "hermes"
    begin, end, list_form = "<tool_call>", "</tool_call>", False


class Granite4ToolCallParser(HermesToolCallParser):
    """IBM Granite 4.0: the Hermes format (vLLM's `granite4`)."""

    name = "granite4"


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    cls.name: cls for cls in (HermesToolCallParser, Granite4ToolCallParser, NemotronToolCallParser)}
