"""A chat request's plan and its choices' output, shared by the server (serving/openai/api/chat.py) and the batch job.

`plan_chat` turns a validated ChatCompletionRequest into what the engine takes (messages, n, sampling with the
output constraint as a `GrammarSpec`, the chat template's variables) and how the output is read back (`Outputs`:
the reasoning parser, the tool-call parser). `ChoiceOutput` reads one choice's text, streamed or whole, into the
OpenAI message: `reasoning_content`, `content` and `tool_calls`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from serving.errors import BadRequest
from serving.grammar import GrammarError, GrammarSpec
from serving.openai.parsers import (REASONING_PARSERS, TOOL_CALL_PARSERS, ReasoningParser, ToolCallParser,
                                    detect_tool_call_parser, get_reasoning_parser, get_tool_call_parser,
                                    starts_in_reasoning)


def add_output_flags(p) -> None:
    """--tool-call-parser and --reasoning-parser, for the server's and the batch job's argparse parsers."""
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_CALL_PARSERS),
                   help="format of the model's tool calls, read into message.tool_calls (default: the one the chat "
                        "template uses, if recognised; tools are refused without one)")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split <think>...</think> reasoning into message.reasoning_content (default: none)")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """The server's output parsing: --tool-call-parser (or the one the chat template implies) and
    --reasoning-parser."""
    tool_parser: type[ToolCallParser] | None = None
    reasoning_parser: type[ReasoningParser] | None = None

    @classmethod
    def create(cls, tool_call_parser: str | None, reasoning_parser: str | None, chat_template: Any = None):
        name = tool_call_parser or detect_tool_call_parser(chat_template if isinstance(chat_template, str) else None)
        return cls(get_tool_call_parser(name) if name else None,
                   get_reasoning_parser(reasoning_parser) if reasoning_parser else None)


@dataclasses.dataclass
class ChatPlan:
    messages: list[dict]
    n: int
    sampling: dict
    template_kwargs: dict
    parse_tools: bool           # read tool calls out of the output
    output: OutputConfig


def plan_chat(body, output: OutputConfig) -> ChatPlan:
    """The engine call and output reading of a validated ChatCompletionRequest; BadRequest (400) for what this
    server cannot do with it (tools without a tool-call parser, an invalid schema)."""
    sampling = body.sampling(body.max_completion_tokens or body.max_tokens)
    if body.logprobs:
        sampling.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    mode = body.tool_choice_mode
    if tools and mode != "none" and output.tool_parser is None:
        raise BadRequest("tool calls need the server started with --tool-call-parser (or a chat template whose "
                         "tool-call format it recognises)", param="tool_choice")
    grammar = _grammar(body, tools, mode, output.tool_parser)
    if grammar is not None:
        sampling["grammar"] = grammar
    kwargs = dict(body.chat_template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    return ChatPlan([m.to_engine() for m in body.messages], body.n, sampling, kwargs,
                    parse_tools=bool(tools) and mode != "none", output=output)


def _grammar(body, tools: list[dict], mode: str, parser: type[ToolCallParser] | None) -> GrammarSpec | None:
    try:
        if mode in ("required", "named"):
            only = body.tool_choice.function.name if mode == "named" else None
            return GrammarSpec.tool_calls(tools, begin=parser.begin, end=parser.end, list_form=parser.list_form,
                                          only=only)
        so = body.structured()
        if so is None:
            return None
        if so.json_object:
            return GrammarSpec.json_object()
        if so.json_ is not None:
            schema = json.loads(so.json_) if isinstance(so.json_, str) else so.json_
            rf = body.response_format
            strict = bool(rf and rf.json_schema and rf.json_schema.strict)
            return GrammarSpec.json_schema(schema, strict=strict)
        if so.regex is not None:
            return GrammarSpec.regex(so.regex)
        if so.choice is not None:
            return GrammarSpec.choice(so.choice)
        return GrammarSpec.lark(so.grammar)
    except (GrammarError, ValueError) as e:
        raise BadRequest(str(e), param="response_format" if body.response_format else "structured_outputs") from None


class ChoiceOutput:
    """One choice's output read into OpenAI's message fields, whole (`message`) or streamed (`feed`, `finish`:
    delta dicts). Both give the same message: the parsers keep streaming and whole parses equal."""

    def __init__(self, plan: ChatPlan, prompt_tail: str, index: int = 0):
        out = plan.output
        self.index = index
        self.reasoning = out.reasoning_parser(starts_in_reasoning(prompt_tail)) if out.reasoning_parser else None
        self.tools = out.tool_parser() if plan.parse_tools else None
        self._content, self._reasoning, self._calls = [], [], {}

    def message(self, text: str) -> dict:
        """The whole output's message."""
        reasoning, content = self.reasoning.parse(text) if self.reasoning else (None, text)
        calls = []
        if self.tools is not None:
            content, parsed = self.tools.parse(content)
            calls = [_call(c.id, c.name, c.arguments) for c in parsed]
        return _message(content, reasoning, calls)

    def feed(self, text: str) -> dict:
        return self._delta(*(self.reasoning.feed(text) if self.reasoning else ("", text)), final=False)

    def finish(self) -> dict:
        return self._delta(*(self.reasoning.finish() if self.reasoning else ("", "")), final=True)

    def _delta(self, reasoning: str, content: str, final: bool) -> dict:
        """A chat chunk's delta for this piece of output ({} when there is nothing to send yet)."""
        calls = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                more, more_calls = self.tools.finish()
                content, calls = content + more, calls + more_calls
        delta: dict = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
            self._reasoning.append(reasoning)
        if content:
            delta["content"] = content
            self._content.append(content)
        if calls:
            delta["tool_calls"] = [self._call_delta(d) for d in calls]
        return delta

    def _call_delta(self, d) -> dict:
        fn = {"arguments": d.arguments} if d.name is None else {"name": d.name, "arguments": d.arguments}
        entry = self._calls.setdefault(d.index, [d.id, d.name, []])
        entry[2].append(d.arguments)
        out = {"index": d.index, "function": fn}
        if d.id is not None:
            out.update(id=d.id, type="function")
        return out

    @property
    def has_calls(self) -> bool:
        return bool(self._calls)

    def streamed_message(self) -> dict:
        """The message a streaming client has assembled from the deltas sent so far."""
        calls = [_call(i, name, "".join(args)) for i, name, args in (self._calls[k] for k in sorted(self._calls))]
        return _message("".join(self._content), "".join(self._reasoning) or None, calls)


def choice(out: ChoiceOutput, result, logprobs: dict | None) -> dict:
    """A non-streamed choice of a finished ChatResult: {"index", "message", "logprobs", "finish_reason"}."""
    msg = out.message(result.text)
    return {"index": out.index, "message": msg, "logprobs": logprobs,
            "finish_reason": finish_reason(result.finish_reason, msg)}


def finish_reason(reason: str, message: dict) -> str:
    """OpenAI's finish reason: "tool_calls" when a finished output called tools."""
    return "tool_calls" if reason == "stop" and message.get("tool_calls") else reason


def seen_message(message: dict) -> dict:
    """The assistant message as the client received it, in the form it sends back (reasoning left out: clients
    drop it, and the conversation compares histories without it)."""
    return {k: v for k, v in message.items() if k != "reasoning_content"}


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _message(content: str, reasoning: str | None, calls: list[dict]) -> dict:
    msg: dict = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = calls
    return msg
