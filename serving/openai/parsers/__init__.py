"""Output parsers (pure Python): reasoning (`<think>` … `</think>`) and tool calls, whole or streamed.

Apply them in that order: the reasoning parser splits the reasoning off, and its content goes to the tool-call
parser. Names follow vLLM's `--reasoning-parser` / `--tool-call-parser` (see `REASONING_PARSERS`,
`TOOL_CALL_PARSERS`); `detect_tool_call_parser` picks a tool-call format from a chat template.
"""
from __future__ import annotations

from serving.openai.parsers.reasoning import (REASONING_PARSERS, DeepSeekR1ReasoningParser, NemotronV3ReasoningParser,
                                              Qwen3ReasoningParser, ReasoningParser, starts_in_reasoning)
from serving.openai.parsers.tool_calls import (TOOL_CALL_PARSERS, Granite4ToolCallParser, HermesToolCallParser,
                                               NemotronToolCallParser, ToolCall, ToolCallDelta, ToolCallParser,
                                               random_call_id)

__all__ = ["REASONING_PARSERS", "TOOL_CALL_PARSERS", "DeepSeekR1ReasoningParser", "Granite4ToolCallParser",
           "HermesToolCallParser", "NemotronToolCallParser", "NemotronV3ReasoningParser", "Qwen3ReasoningParser",
           "ReasoningParser", "ToolCall", "ToolCallDelta", "ToolCallParser", "detect_tool_call_parser",
           "get_reasoning_parser", "get_tool_call_parser", "random_call_id", "starts_in_reasoning"]


def _lookup(registry: dict, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]


def get_tool_call_parser(name: str) -> type[ToolCallParser]:
    """The tool-call parser class registered as `name`; ValueError listing the valid names otherwise."""
    return _lookup(TOOL_CALL_PARSERS, "tool-call parser", name)


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The reasoning parser class registered as `name`; ValueError listing the valid names otherwise."""
    return _lookup(REASONING_PARSERS, "reasoning parser", name)


def detect_tool_call_parser(chat_template: str | None) -> str | None:
    """The tool-call parser name for a chat template's format: `nemotron_json` when it mentions `<TOOLCALL>`,
    `hermes` when it mentions `<tool_call>` with JSON calls; None otherwise, and for the XML calls
    (`<tool_call><function=…>`, Qwen3-Coder / Nemotron 3) that no parser here reads."""
    if not chat_template:
        return None
    if NemotronToolCallParser.begin in chat_template:
        return NemotronToolCallParser.name
    if HermesToolCallParser.begin in chat_template and "<function=" not in chat_template:
        return HermesToolCallParser.name
    return None
