"""Output parsers: tool calls and `<think>` reasoning, whole and streamed (every chunking gives the whole result)."""
from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from serving.openai.parsers import (REASONING_PARSERS, TOOL_CALL_PARSERS, HermesToolCallParser, NemotronToolCallParser,
                                    ToolCallParser, detect_tool_call_parser, get_reasoning_parser, get_tool_call_parser,
                                    starts_in_reasoning)

SEEDS = range(150)


def call(name: str, arguments: str) -> str:
    return json.dumps({"name": name, "arguments": json.loads(arguments)}, ensure_ascii=False)


def kept(text: str) -> tuple[str, str, list]:
    """A case whose text stays content, verbatim."""
    return text, text, []


def block(name: str, arguments: str) -> str:
    return f"<tool_call>\n{call(name, arguments)}\n</tool_call>"


def toolcall(*calls: tuple[str, str]) -> str:
    return "<TOOLCALL>[" + ", ".join(call(n, a) for n, a in calls) + "]</TOOLCALL>"


WEATHER = ("get_weather", '{"city":"Paris"}')
TIME = ("get_time", '{"tz":"CET","fmt":[24,"h"]}')
TRICKY = ("search", '{"q":{"nested":[1,{"deep":[true,null]}],"empty":{}},'
                    '"text":"Zürich 東京 🌍 \\"quoted\\" {brace} [bracket] \\\\ back","n":-1.5}')
TAGGED = ("echo", '{"text":"say </tool_call> then <tool_call> and </TOOLCALL> <TOOLCALL> ]}"}')

# (text, content, calls as (name, arguments)) per parser.
HERMES_CASES = [
    kept("Hello there, no tools today."),
    kept(""),
    (block(*WEATHER), "", [WEATHER]),
    (block(*WEATHER) + "\n" + block(*TIME) + "\n", "", [WEATHER, TIME]),
    ("Let me check.\n\n" + block(*WEATHER), "Let me check.", [WEATHER]),
    (block(*TRICKY), "", [TRICKY]),
    (block(*TAGGED), "", [TAGGED]),
    ('<tool_call>{"name":"compact","arguments":{"a":1}}</tool_call>', "", [("compact", '{"a":1}')]),
    ('<tool_call>  \n {"name": "noargs"}  </tool_call>', "", [("noargs", "{}")]),
    ('<tool_call>{"name": "u", "arguments": {"s": "\\u00fc\\n", "x": 1e3}}</tool_call>', "",
     [("u", '{"s":"ü\\n","x":1000.0}')]),
    ("Sure.\n" + block(*WEATHER) + "\n" + block(*TIME) + "\nDone.\n", "Sure.\nDone.\n", [WEATHER, TIME]),
    (block(*WEATHER) + "\n\nAnything else?", "Anything else?", [WEATHER]),
    # malformed blocks stay content, verbatim
    kept('Text <tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call> tail'),
    kept('<tool_call>{"arguments": {}}</tool_call>'),
    kept('<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),
    kept('<tool_call>[{"name": "f", "arguments": {}}]</tool_call>'),
    kept("Use the <tool_call> tag to call."),
    kept("<tool_call>\n</tool_call>"),
    (block(*WEATHER) + "\n<tool_call>{oops}</tool_call>", "<tool_call>{oops}</tool_call>", [WEATHER]),
    # looks like a tag, is not
    kept("a <tool_cal x> b <TOOL <tool"),
    kept("<TOOLCALL>[]</TOOLCALL>"),
    # unterminated at the end of the output: a call if its JSON is complete, content otherwise
    ("ok\n<tool_call>\n" + call(*WEATHER) + "\n", "ok", [WEATHER]),
    kept('ok <tool_call>\n{"name": "get_weather", "argu'),
    (block(*WEATHER) + "\n<tool_call>\n" + call(*TIME) + "\n</tool_ca", "<tool_call>\n" + call(*TIME) + "\n</tool_ca",
     [WEATHER]),
]
NEMOTRON_CASES = [
    kept("Plain answer."),
    (toolcall(WEATHER), "", [WEATHER]),
    (toolcall(WEATHER, TIME, TRICKY), "", [WEATHER, TIME, TRICKY]),
    ("I will look that up.\n" + toolcall(WEATHER, TIME), "I will look that up.", [WEATHER, TIME]),
    (toolcall(TAGGED) + "\n", "", [TAGGED]),
    ("<TOOLCALL>[]</TOOLCALL>", "", []),
    kept('<TOOLCALL>[{"name": "f"}, oops]</TOOLCALL>'),
    kept('<TOOLCALL>{"name": "f", "arguments": {}}</TOOLCALL>'),
    kept("<TOOL"),
    kept("a <TOOLCAL b <TOOLCALL"),
    kept(block(*WEATHER)),
    (toolcall(WEATHER)[:-len("</TOOLCALL>")], "", [WEATHER]),
    kept(toolcall(WEATHER)[:-len("]</TOOLCALL>")]),
]
TOOL_CASES = [(HermesToolCallParser, *c) for c in HERMES_CASES] + [(NemotronToolCallParser, *c) for c in NEMOTRON_CASES]
TOOL_IDS = [f"hermes-{i}" for i in range(len(HERMES_CASES))] + [f"nemotron-{i}" for i in range(len(NEMOTRON_CASES))]


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def chunkings(text: str):
    """Whole, one character at a time, and random cuts (any str position, inside tags and strings)."""
    yield [text]
    yield list(text)
    for seed in SEEDS:
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(len(text) - 1, 12)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def stream_tools(parser: ToolCallParser, chunks: list[str]):
    content, deltas = [], []
    for piece in chunks:
        c, d = parser.feed(piece)
        content.append(c)
        deltas += d
    c, d = parser.finish()
    content.append(c)
    deltas += d
    calls: dict[int, list] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id is not None and d.name is not None, "a call's first delta carries its id and name"
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.id is None and d.name is None
        calls[d.index][2] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return "".join(content), [tuple(calls[i]) for i in range(len(calls))]


@pytest.mark.parametrize("cls,text,content,expected", TOOL_CASES, ids=TOOL_IDS)
def test_tool_call_parse(cls, text, content, expected):
    got_content, calls = cls(ids()).parse(text)
    assert got_content == content
    assert [(c.id, c.name, c.arguments) for c in calls] == [(f"call_{i}", *e) for i, e in enumerate(expected)]
    for c in calls:
        assert json.dumps(json.loads(c.arguments), ensure_ascii=False, separators=(",", ":")) == c.arguments


@pytest.mark.parametrize("cls,text,content,expected", TOOL_CASES, ids=TOOL_IDS)
def test_tool_call_stream_equals_parse(cls, text, content, expected):
    whole_content, whole_calls = cls(ids()).parse(text)
    whole = [(c.id, c.name, c.arguments) for c in whole_calls]
    for chunks in chunkings(text):
        assert stream_tools(cls(ids()), chunks) == (whole_content, whole), chunks


def test_tool_call_streaming_holds_back_only_possible_tags():
    p = HermesToolCallParser(ids())
    assert p.feed("Hi <tool") == ("Hi", [])
    assert p.feed("box> x") == (" <toolbox> x", [])
    assert p.feed(" <tool_call>") == ("", [])
    assert p.feed('{"name": "f", "arguments": {"a": "<tool_call>"}}') == ("", [])
    content, deltas = p.feed("</tool_call>")
    assert content == "" and [(d.index, d.id, d.name, d.arguments) for d in deltas] == [(0, "call_0", "f",
                                                                                          '{"a":"<tool_call>"}')]
    assert p.finish() == ("", [])


def test_tool_call_default_ids_and_parse_leaves_stream_state():
    p = HermesToolCallParser()
    p.feed("<tool_call>")
    _, calls = p.parse(block(*WEATHER) + block(*TIME))
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls) and calls[0].id != calls[1].id
    assert p.feed(call(*WEATHER))[1] == [] and p.finish()[1][0].name == "get_weather"


def test_tool_call_registry():
    assert set(TOOL_CALL_PARSERS) == {"hermes", "granite4", "nemotron_json"}
    assert get_tool_call_parser("granite4").begin == "<tool_call>"
    for name, cls in TOOL_CALL_PARSERS.items():
        assert cls.name == name and isinstance(cls.list_form, bool) and cls.begin and cls.end
    assert get_tool_call_parser("nemotron_json").list_form and not get_tool_call_parser("hermes").list_form
    with pytest.raises(ValueError, match="granite4, hermes, nemotron_json"):
        get_tool_call_parser("mistral")


@pytest.mark.parametrize("template,name", [
    ("{%- if tools %}Call tools as <TOOLCALL>[...]</TOOLCALL>{% endif %}", "nemotron_json"),
    ("<tools>{{ tools }}</tools> return <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call>", "hermes"),
    ("<tool_call>\n<function=name>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>", None),
    ("{{ messages }}", None),
    ("", None),
    (None, None),
])
def test_detect_tool_call_parser(template, name):
    assert detect_tool_call_parser(template) == name


# (parser name, starts_in_reasoning, text, reasoning, content)
REASONING_CASES = [
    ("qwen3", False, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("qwen3", False, "Just an answer.\n", None, "Just an answer.\n"),
    ("qwen3", False, "", None, ""),
    ("qwen3", False, "<think></think>Answer", None, "Answer"),
    ("qwen3", False, "<thi", None, "<thi"),
    ("qwen3", False, "<thinking> is a word", None, "<thinking> is a word"),
    ("qwen3", False, " <think>not at the start</think>x", None, " <think>not at the start</think>x"),
    ("qwen3", False, "<think>cut off while thin", "cut off while thin", ""),
    ("qwen3", False, "<think>a </thin b </think> c", "a </thin b", "c"),
    ("qwen3", True, "Reasoning 東京 🌍\n</think>\n\nContent </think> <think> stays\n", "Reasoning 東京 🌍",
     "Content </think> <think> stays\n"),
    ("qwen3", True, "\n\ntruncated reasoning\n", "truncated reasoning\n", ""),
    ("qwen3", True, "<think>\nR</think>C", "R", "C"),
    ("qwen3", True, "partial end </thi", "partial end </thi", ""),
    ("qwen3", True, "</think>", None, ""),
    ("nemotron_v3", True, "Okay, 2+2.\n</think>\n4", "Okay, 2+2.", "4"),
    ("nemotron_v3", False, "4", None, "4"),
    ("nano_v3", False, "<think>\nx\n</think>\ny", "x", "y"),
    ("deepseek_r1", False, "no tags at all", "no tags at all", ""),
    ("deepseek_r1", False, "<think>\nr\n</think>\n\nc", "r", "c"),
    ("deepseek_r1", False, "r\n</think>\n\n" + toolcall(WEATHER), "r", toolcall(WEATHER)),
]
REASONING_IDS = [f"{c[0]}-{i}" for i, c in enumerate(REASONING_CASES)]


def stream_reasoning(parser, chunks: list[str]) -> tuple[str, str]:
    reasoning, content = [], []
    for r, c in [parser.feed(piece) for piece in chunks] + [parser.finish()]:
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("name,starts,text,reasoning,content", REASONING_CASES, ids=REASONING_IDS)
def test_reasoning_parse(name, starts, text, reasoning, content):
    assert get_reasoning_parser(name)(starts).parse(text) == (reasoning, content)


@pytest.mark.parametrize("name,starts,text,reasoning,content", REASONING_CASES, ids=REASONING_IDS)
def test_reasoning_stream_equals_parse(name, starts, text, reasoning, content):
    cls = get_reasoning_parser(name)
    whole_reasoning, whole_content = cls(starts).parse(text)
    for chunks in chunkings(text):
        assert stream_reasoning(cls(starts), chunks) == (whole_reasoning or "", whole_content), chunks


def test_reasoning_streaming_holds_back_only_possible_tags():
    p = get_reasoning_parser("qwen3")(starts_in_reasoning=True)
    assert p.feed("Think <") == ("Think", "")
    assert p.feed("b> more\n</thi") == (" <b> more", "")
    assert p.feed("nk>\n") == ("", "")
    assert p.feed("\nAnswer") == ("", "Answer")
    assert p.finish() == ("", "")


def test_reasoning_then_tool_calls_streamed():
    text = "I should call <TOOLCALL> now.\n</think>\n\nChecking.\n" + toolcall(WEATHER, TIME)
    for chunks in chunkings(text):
        reasoner = get_reasoning_parser("nemotron_v3")(starts_in_reasoning=True)
        pieces = [reasoner.feed(piece) for piece in chunks] + [reasoner.finish()]
        assert "".join(r for r, _ in pieces) == "I should call <TOOLCALL> now."
        tools = get_tool_call_parser("nemotron_json")(ids())
        assert stream_tools(tools, [c for _, c in pieces]) == ("Checking.", [("call_0", *WEATHER), ("call_1", *TIME)])


def test_reasoning_registry():
    assert {"deepseek_r1", "qwen3", "nemotron_v3", "nano_v3"} <= set(REASONING_PARSERS)
    assert get_reasoning_parser("nano_v3") is get_reasoning_parser("nemotron_v3")
    with pytest.raises(ValueError, match="deepseek_r1"):
        get_reasoning_parser("granite")


@pytest.mark.parametrize("prompt,inside", [
    ("<|im_start|>assistant\n<think>\n", True),
    ("<|im_start|>assistant\n<think>", True),
    ("<|im_start|>assistant\n<think></think>", False),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    ("<think>old</think>answer<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
    ("<think>old</think>answer<|im_end|>\n<|im_start|>assistant\n", False),
    ("<|im_start|>assistant\n", False),
    ("", False),
])
def test_starts_in_reasoning(prompt, inside):
    assert starts_in_reasoning(prompt) is inside
