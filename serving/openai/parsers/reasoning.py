"""Reasoning parsers: split `<think>` … `</think>` reasoning off a model's generated text, whole or streamed.

One parser instance per request. `parse(text)` splits a whole output; `feed(delta)` / `finish()` split it while it
streams. Both run the same state machine, and streaming holds back only text that may still turn out to be a tag,
so the joined deltas always equal `parse` of the joined text, however the text was cut.

The rules, shared by every name (they differ only in where the output starts):
* The output starts inside the reasoning when the prompt already opened `<think>` (`starts_in_reasoning`), else in
  the content. A `<think>` at the very start of the output (no leading whitespace) opens the reasoning either way and
  is dropped; a `<think>` anywhere else is plain text.
* The first `</think>` ends the reasoning; everything after it is content (a later `<think>` stays content).
* Whitespace at the reasoning's edges (after `<think>`, before `</think>`) and at the start of the content after
  `</think>` is dropped: templates surround the tags with newlines (Qwen3's own template strips them too).
* An output that never closes the reasoning is all reasoning (it was cut off while thinking), as in vLLM.

`parse` returns `None` as reasoning when there is none (no reasoning section, or an empty one).
"""
from __future__ import annotations

from typing import ClassVar

__all__ = ["REASONING_PARSERS", "DeepSeekR1ReasoningParser", "NemotronV3ReasoningParser", "Qwen3ReasoningParser",
           "ReasoningParser", "emit_len", "starts_in_reasoning"]

THINK, END_THINK = "<think>", "</think>"


def emit_len(text: str, tag: str) -> int:
    """How much of `text` can be emitted now: all but a trailing partial `tag` (a suffix of `text` that is a proper
    prefix of `tag`) and the whitespace right before it, which belongs to the tag's surroundings if it completes."""
    held = next((n for n in range(min(len(text), len(tag) - 1), 0, -1) if text.endswith(tag[:n])), 0)
    return len(text[:len(text) - held].rstrip())


def starts_in_reasoning(prompt_text_tail: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` block (its last `<think>` is not closed), so that the
    generated text starts in the reasoning: e.g. Qwen3.5 and Nemotron templates end with `<think>\\n` when thinking is
    on and with a closed `<think></think>` when it is off."""
    return prompt_text_tail.rfind(THINK) > prompt_text_tail.rfind(END_THINK)


class ReasoningParser:
    """`<think>` … `</think>` splitter (see the module docstring); subclasses name the formats vLLM names."""

    name: ClassVar[str]
    always_starts_in_reasoning: ClassVar[bool] = False  # True: the output starts in the reasoning whatever the prompt

    def __init__(self, starts_in_reasoning: bool = False):
        self._starts_in_reasoning = starts_in_reasoning or self.always_starts_in_reasoning
        self._state = "start"  # "start" (a leading <think> may still come), "reasoning" or "content"
        self._strip = False  # drop the whitespace that opens the current section
        self._buf = ""  # text not yet emitted

    def parse(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a whole output; independent of this instance's streaming state."""
        whole = type(self)(self._starts_in_reasoning)
        reasoning, content = whole.feed(text)
        more_reasoning, more_content = whole.finish()
        return (reasoning + more_reasoning) or None, content + more_content

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of streamed output."""
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """(reasoning delta, content delta) still held back when the output ends."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        out = {"reasoning": [], "content": []}
        progressed = True
        while progressed:
            progressed = self._step(out, final)
        return "".join(out["reasoning"]), "".join(out["content"])

    def _enter(self, state: str, strip: bool) -> bool:
        self._state, self._strip = state, strip
        return True

    def _step(self, out: dict[str, list[str]], final: bool) -> bool:
        """Emit what the buffer holds in the current state; True when the state changed (look again)."""
        if self._state == "start":
            return self._open(final)
        if self._strip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._strip = False
        if self._state == "content":
            out["content"].append(self._buf)
            self._buf = ""
            return False
        end = self._buf.find(END_THINK)
        if end >= 0:
            out["reasoning"].append(self._buf[:end].rstrip())
            self._buf = self._buf[end + len(END_THINK):]
            return self._enter("content", strip=True)
        n = len(self._buf) if final else emit_len(self._buf, END_THINK)
        out["reasoning"].append(self._buf[:n])
        self._buf = self._buf[n:]
        return False

    def _open(self, final: bool) -> bool:
        """At the output's start: consume a leading `<think>`, wait while one may still come, else go on in the
        state the prompt left."""
        if self._buf.startswith(THINK):
            self._buf = self._buf[len(THINK):]
            return self._enter("reasoning", strip=True)
        if THINK.startswith(self._buf) and not final:
            return False
        return self._enter("reasoning" if self._starts_in_reasoning else "content", strip=self._starts_in_reasoning)


class DeepSeekR1ReasoningParser(ReasoningParser):
    """vLLM's `deepseek_r1`: the output always starts in the reasoning (R1's template opens `<think>`; a `<think>`
    the model writes itself is dropped), so an output without `</think>` is all reasoning."""

    name = "deepseek_r1"
    always_starts_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """vLLM's `qwen3`: the prompt decides. Qwen3.5 templates open `<think>` in the prompt (`starts_in_reasoning`);
    Qwen3 up to 2507 lets the model write `<think>` itself; `enable_thinking=False` closes `<think></think>` in the
    prompt, and the output is then all content."""

    name = "qwen3"


class NemotronV3ReasoningParser(ReasoningParser):
    """vLLM's `nemotron_v3` (NVIDIA's model cards: `nano_v3`), also right for Nemotron Nano 2: the templates end the
    prompt with `<think>\\n` when thinking is on and with `<think></think>` when it is off (`/no_think`,
    `enable_thinking=False`), where vLLM's parser too returns the output as content."""

    name = "nemotron_v3"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    **{cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser, NemotronV3ReasoningParser)},
    "nano_v3": NemotronV3ReasoningParser,
}
