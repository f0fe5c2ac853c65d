"""Agent and reasoning workloads through the real server (`python -m serving` subprocess, real `openai` client) on a
tiny random-weight model: structured outputs enforced by the grammar engine, forced tool calls, an agent loop that
keeps hitting the conversation cache across tool turns, reasoning content, n > 1 over one prefill, penalties,
logit_bias and min_tokens, and unknown fields refused.

The model's weights are random, so whatever it writes inside a constraint is noise: the tests check that the
output always satisfies the constraint (JSON valid for its schema, tool calls whose arguments validate against
the function's parameters), which only the token mask in the sampling step can guarantee.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

import test_server
from test_server import NAME, ServerProcess

# A Hermes-style template over the byte tokenizer's special tokens: tools in a system block, assistant tool calls
# as <tool_call> blocks, tool results as user turns, and `enable_thinking` opening a <think> block.
TEMPLATE = (
    "{%- if tools %}<|system|>Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|end|>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls is defined %}<|assistant|>{{ m.content or '' }}"
    "{%- for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}<|end|>"
    "{%- elif m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response><|end|>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and enable_thinking %}"
    "<think>\n{% endif %}{% endif %}"
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {"name": "book_table", "parameters": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 8, "pattern": "^[a-z]+$"},
                                     "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                                     "vegan": {"type": "boolean"}},
    "required": ["name", "guests"], "additionalProperties": False}}}
TOOLS = [WEATHER, BOOK]
ARGS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("agent-server")
    template = work / "template.jinja"
    template.write_text(TEMPLATE)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    args = ["--model", tiny_model_dir, "--served-model-name", NAME, "--max-model-len", "4096", "--max-num-seqs",
            "4", "--chat-template", str(template), "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
            "--log-level", "warning"]
    srv = ServerProcess("agent", work, args, env)
    saved, test_server.MODEL = test_server.MODEL, None  # this module serves its own model
    try:
        srv.start()
    finally:
        test_server.MODEL = saved
    yield srv
    srv.stop()


def _schemas() -> list[dict]:
    """50 schemas with nested objects, arrays, enums, bounds and required fields; every string bounded (a random
    model writes noise, so an unbounded string would only end by chance)."""
    word = {"type": "string", "maxLength": 6, "pattern": "^[a-z]*$"}
    colour = {"type": "string", "enum": ["red", "green", "blue"]}
    out = []
    for i in range(50):
        item = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                 "tag": colour if i % 2 else word},
                "required": ["id"] if i % 3 else ["id", "tag"], "additionalProperties": False}
        props = {"name": word, "count": {"type": "integer", "minimum": -5, "maximum": 5 + i},
                 "ok": {"type": "boolean"},
                 "items": {"type": "array", "items": item, "minItems": i % 3, "maxItems": 1 + i % 3}}
        if i % 4 == 0:
            props["inner"] = {"type": "object", "properties": {"level": colour, "score": {"type": "number",
                              "minimum": 0, "maximum": 1}}, "required": ["level"], "additionalProperties": False}
        required = sorted(props)[: 1 + i % len(props)]
        out.append({"type": "object", "properties": props, "required": required, "additionalProperties": False})
    return out


def _content(client, stream: bool, **kw) -> tuple[str, str]:
    """(content, finish_reason) of one chat completion, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model=NAME, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model=NAME, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def test_json_schema_outputs_validate(agent_server):
    client = agent_server.client()
    schemas = _schemas()

    def run(i):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i], "strict": True}}
        return _content(client, i % 2 == 1, messages=[{"role": "user", "content": f"Give me record {i}."}],
                        response_format=fmt, temperature=1.0, seed=i, max_tokens=600)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(len(schemas))))
    for schema, (text, reason) in zip(schemas, results):
        assert reason == "stop", (reason, text)
        jsonschema.validate(json.loads(text), schema)
    assert len({t for t, _ in results}) > 40  # the outputs are the model's (seeded noise), not a template


def test_json_object(agent_server):
    client = agent_server.client()
    for stream in (False, True):
        text, reason = _content(client, stream, messages=[{"role": "user", "content": "JSON please"}],
                                response_format={"type": "json_object"}, temperature=0.7, seed=3, max_tokens=300)
        assert isinstance(json.loads(text), dict), text


def _calls(client, stream: bool, **kw) -> tuple[list[dict], str]:
    """([{"id", "name", "arguments"}], finish_reason), rebuilt from deltas when streamed."""
    if not stream:
        r = client.chat.completions.create(model=NAME, **kw)
        c = r.choices[0]
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                 for t in c.message.tool_calls or []]
        return calls, c.finish_reason
    calls: dict[int, dict] = {}
    reason = None
    for chunk in client.chat.completions.create(model=NAME, stream=True, **kw):
        for ch in chunk.choices:
            reason = ch.finish_reason or reason
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": d.id, "name": None, "arguments": ""})
                if d.function.name:
                    entry["name"] = d.function.name
                entry["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_validate(agent_server, choice):
    client = agent_server.client()
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "book_table"}}

    def run(i):
        return _calls(client, i % 2 == 1, messages=[{"role": "user", "content": f"Help me {i}"}], tools=TOOLS,
                      tool_choice=tool_choice, temperature=1.0, seed=100 + i, max_tokens=400)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(12)))
    for calls, reason in results:
        assert reason == "tool_calls" and calls
        if choice == "named":
            assert [c["name"] for c in calls] == ["book_table"]
        for c in calls:
            assert c["id"].startswith("call_")
            jsonschema.validate(json.loads(c["arguments"]), ARGS[c["name"]])


def _committed(srv, conv: str, salt: str) -> int:
    r = httpx.get(f"{srv.url}/v1/conversations/{conv}", params={"cache_salt": salt}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


@pytest.mark.parametrize("resend", [False, True], ids=["new-messages-only", "full-history"])
def test_agent_loop_keeps_hitting_the_cache(agent_server, resend):
    """Six turns: assistant tool call, tool result, assistant tool call, ... Each turn's cached_tokens is the
    length the conversation committed before it, whether the client sends only the new message or resends
    the whole history with the tool calls as it received them."""
    client = agent_server.client()
    conv, salt = "agent", f"agents-{resend}"  # salts apart: the same first prompt would hit the other run
    history = [{"role": "user", "content": "Plan a dinner in Oslo for four."}]
    new = list(history)
    committed = 0
    for turn in range(6):
        last = turn == 5
        kw = dict(tools=TOOLS, tool_choice="none" if last else "required", temperature=1.0, seed=turn,
                  max_tokens=12 if last else 300)
        r = client.chat.completions.create(model=NAME, messages=history if resend else new, **kw,
                                           extra_body={"conversation_id": conv, "cache_salt": salt})
        assert r.usage.prompt_tokens_details.cached_tokens == committed, (turn, committed)
        committed = _committed(agent_server, conv, salt)
        msg = r.choices[0].message
        if last:
            assert not msg.tool_calls
            break
        assert msg.tool_calls and r.choices[0].finish_reason == "tool_calls", (turn, r.choices[0])
        history.append(msg.model_dump(exclude_none=True))  # as an agent keeps it
        new = [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"ok": True, "turn": turn})}
               for c in msg.tool_calls]
        history += new


def test_reasoning_content_and_template_kwargs(agent_server):
    client = agent_server.client()
    msgs = [{"role": "user", "content": "Think first."}]
    # the regex makes the random model write a <think> block, then an answer
    so = {"regex": "<think>[a-z]{1,12}</think>[a-z]{1,12}"}
    whole = client.chat.completions.create(model=NAME, messages=msgs, temperature=1.0, seed=5, max_tokens=60,
                                           extra_body={"structured_outputs": so})
    m = whole.choices[0].message
    reasoning = m.model_extra["reasoning_content"]
    assert re.fullmatch("[a-z]{1,12}", reasoning) and re.fullmatch("[a-z]{1,12}", m.content)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, temperature=1.0, seed=5, max_tokens=60,
                                                 stream=True, extra_body={"structured_outputs": so}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == m.content
    # chat_template_kwargs reach the template: enable_thinking opens <think> in the prompt, so the output starts
    # inside the reasoning
    plain = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=8)
    think = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=8,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert think.usage.prompt_tokens == plain.usage.prompt_tokens + len("<think>\n")
    assert think.choices[0].message.model_extra["reasoning_content"] and not think.choices[0].message.content


def _metric(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    return float(re.search(rf"^hybrid_serve_{name} (\S+)$", text, re.M).group(1))


def test_n_choices_fork_one_prefill(agent_server):
    client = agent_server.client()
    msgs = [{"role": "user", "content": "Tell me four different stories about a lighthouse keeper " * 3}]
    before = _metric(agent_server, "prompt_tokens_total") - _metric(agent_server, "cached_prompt_tokens_total")
    r = client.chat.completions.create(model=NAME, messages=msgs, n=4, temperature=1.0, seed=11, max_tokens=16,
                                       extra_body={"cache_salt": "n-choices"})
    computed = _metric(agent_server, "prompt_tokens_total") - _metric(agent_server, "cached_prompt_tokens_total")
    prompt = r.usage.prompt_tokens
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert computed - before <= prompt + 3  # the prompt once, then one token per further choice
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1
    again = client.chat.completions.create(model=NAME, messages=msgs, n=4, temperature=1.0, seed=11, max_tokens=16,
                                           extra_body={"cache_salt": "n-choices-2"})
    assert [c.message.content for c in again.choices] == texts
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, n=4, temperature=1.0, seed=11,
                                                 max_tokens=16, stream=True, extra_body={"cache_salt": "n-3"}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(4)]
    assert streamed == texts


def test_logit_bias_min_tokens_and_penalties(agent_server):
    client = agent_server.client()
    msgs = [{"role": "user", "content": "Say something."}]

    def run(**kw):
        r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=24, **kw)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    text, n, _ = run(logit_bias={str(ord("q")): 100})
    assert text == "q" * 24
    end = {"262": 100}  # <|end|>: the reply stops at once ...
    assert run(logit_bias=end)[1:] == (1, "stop")
    text, n, reason = run(logit_bias=end, extra_body={"min_tokens": 6})  # ... unless min_tokens bars it
    assert reason == "stop" and n == 7 and text
    base = run(extra_body={"ignore_eos": True})[0]
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        kw.setdefault("extra_body", {})["ignore_eos"] = True
        out = run(**kw)[0]
        assert out != base, kw


@pytest.mark.parametrize("field,value", [("guided_whitespace_pattern", "x"), ("frobnicate", 1),
                                         ("reasoning_effort", "high")])
def test_unknown_fields_are_refused(agent_server, field, value):
    r = httpx.post(agent_server.url + "/v1/chat/completions", timeout=30,
                   json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_noop_fields_accepted_and_constraints_checked(agent_server):
    r = httpx.post(agent_server.url + "/v1/chat/completions", timeout=60,
                   json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                         "metadata": {"a": "b"}, "store": False, "user": "u1", "service_tier": "auto"})
    assert r.status_code == 200, r.text
    bad = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format"),
           ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
           ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, None)]
    for extra, param in bad:
        r = httpx.post(agent_server.url + "/v1/chat/completions", timeout=60,
                       json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], **extra})
        assert r.status_code == 400, r.text
        if param:
            assert r.json()["error"]["param"] == param, r.text
