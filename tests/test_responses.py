"""The Responses API (`/v1/responses`) end to end: `python -m serving` as a real subprocess on 127.0.0.1 (one server
for the module, with --cache-dir and an API key), driven by the real `openai` client (`client.responses.create /
retrieve / delete`, streamed and not) and by raw httpx for the wire format and the errors.

The reference for every answer is the same history sent to `/v1/chat/completions` at temperature 0 on the same
server: a `previous_response_id` chain must answer exactly what the full history answers.

The store itself (serving/responses_store.py: LRU bound, tenants, deletes, the atomic 0600 file) is tested
without a server at the top.

The last section holds the cache-hit test of the chain: a previous_response_id continues exactly from the
checkpoint its response committed (the engine finds it by tokens).
"""
from __future__ import annotations

import json
import os
import signal
import stat

import httpx
import openai
import pytest
from openai.types.responses import (Response, ResponseCompletedEvent, ResponseContentPartAddedEvent,
                                    ResponseContentPartDoneEvent, ResponseCreatedEvent, ResponseIncompleteEvent,
                                    ResponseInProgressEvent, ResponseOutputItemAddedEvent,
                                    ResponseOutputItemDoneEvent, ResponseTextDeltaEvent, ResponseTextDoneEvent)

import test_server
from serving.responses_store import FILENAME, ResponsesStore, Segment
from serving.store import StateStore
from test_server import COMMON, KEY, NAME, ServerProcess, assert_openai_error

MAX_OUT = 24
MAX_STORED = 64
# A chain that needs its history: facts stated early are asked for later (the default model's recall task).
CHAIN = ["My name is Zora.", "What is 3+4?", "What is my name?", "Say hello.", "Who am I?"]


# --------------------------------------------------------------------------------------------------
# The store, without a server
# --------------------------------------------------------------------------------------------------

def _msgs(i):
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


def test_store_chain_history_lru_and_tenants():
    s = ResponsesStore(3)
    a = s.add("a", "t1", {"id": "a"}, None, _msgs(0))
    b = s.add("b", "t1", {"id": "b"}, a, _msgs(1))
    assert s.get("b", "t1").history() == _msgs(0) + _msgs(1)
    assert s.get("b", "t2") is None and s.get("b", None) is None  # another tenant: as unknown
    assert not s.delete("b", "t2") and s.get("b", "t1") is b
    # Deleting an ancestor removes it, not its content from the responses that continued it.
    assert s.delete("a", "t1") and s.get("a", "t1") is None and not s.delete("a", "t1")
    c = s.add("c", "t1", {"id": "c"}, b, _msgs(2))
    assert c.history() == _msgs(0) + _msgs(1) + _msgs(2)
    # LRU: b is used (get), then two more arrive: c, the least recently used, goes first.
    s.get("b", "t1")
    s.add("d", None, {"id": "d"}, None, _msgs(3))
    s.add("e", None, {"id": "e"}, None, _msgs(4))
    assert len(s) == 3 and s.get("c", "t1") is None and s.evictions == 1
    assert [s.get(k, t) is not None for k, t in [("b", "t1"), ("d", None), ("e", None)]] == [True] * 3
    assert ResponsesStore(0).add("x", None, {}, None, _msgs(0)) is None  # 0: stores nothing


def test_store_save_load_private_atomic(tmp_path):
    s = ResponsesStore(10)
    a = s.add("a", "t", {"id": "a", "output": ["é ∑"]}, None, _msgs(0))
    s.add("b", "t", {"id": "b"}, a, _msgs(1))
    s.add("c", None, {"id": "c"}, a, _msgs(2))  # a fork of a
    s.delete("a", "t")                          # a's messages stay, as part of b and c
    os.umask(0o022)
    path = s.save(str(tmp_path))
    assert os.path.basename(path) == FILENAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == [FILENAME]  # no temporary file left behind
    data = json.loads(open(path).read())
    assert len(data["segments"]) == 3  # a's messages stored once, though b and c both continue it
    t = ResponsesStore(10)
    assert t.load(str(tmp_path)) == 2
    assert t.get("a", "t") is None and t.get("b", "t").response == {"id": "b"}
    assert t.get("b", "t").history() == _msgs(0) + _msgs(1) and t.get("c", None).history() == _msgs(0) + _msgs(2)
    assert t.get("b", "t").segment.parent is t.get("c", None).segment.parent  # still shared after the load
    # A rewrite replaces the file in place, still 0600; a smaller store keeps the most recently used.
    s.save(str(tmp_path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    small = ResponsesStore(1)
    assert small.load(str(tmp_path)) == 1 and small.get("c", None) is not None
    assert ResponsesStore(5).load(str(tmp_path / "missing")) == 0


def test_store_long_chain_and_bad_files(tmp_path):
    s = ResponsesStore(10)
    seg = None
    for i in range(5000):  # deeper than Python's recursion limit
        seg = Segment(seg, tuple(_msgs(i)))
    s.add("deep", None, {}, seg, _msgs(5000))
    s.save(str(tmp_path))
    t = ResponsesStore(10)
    assert t.load(str(tmp_path)) == 1 and len(t.get("deep", None).history()) == 2 * 5001
    (tmp_path / FILENAME).write_text("{not json")
    with pytest.raises(ValueError):
        t.load(str(tmp_path))
    (tmp_path / FILENAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError):
        t.load(str(tmp_path))
    (tmp_path / FILENAME).write_text(json.dumps({"format": 1, "segments": {}, "responses": [
        {"id": "x", "salt": None, "response": {}, "segment": "7"}]}))
    with pytest.raises(ValueError):
        t.load(str(tmp_path))
    assert t.get("deep", None) is not None  # a failed load leaves the store as it was


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax-cache")))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("HYBRID_SERVE_API_KEY", None)
    return env


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("responses-cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_env, cache_dir):
    srv = ServerProcess("responses", tmp_path_factory.mktemp("responses-server"),
                        [*COMMON, "--cache-mode", "exact", "--api-key", KEY, "--cache-dir", str(cache_dir),
                         "--max-stored-responses", str(MAX_STORED)], server_env).start()
    yield srv
    srv.stop()


def _input(text: str, form: int):
    """The same user message in the input shapes the client may send."""
    return [text,
            [{"role": "user", "content": text}],
            [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
            [{"role": "user", "content": [{"type": "input_text", "text": text[:3]},
                                          {"type": "input_text", "text": text[3:]}]}]][form % 4]


def create(client: openai.OpenAI, inp, prev: str | None = None, *, stream: bool = False, salt: str | None = None,
           **kw) -> Response:
    """client.responses.create, checked: a streamed response's events in OpenAI's order, parsed by the client
    into their types, with consecutive sequence numbers, and deltas that add up to the final text."""
    args = dict(model=NAME, input=inp, temperature=0, max_output_tokens=MAX_OUT)
    if prev is not None:
        args["previous_response_id"] = prev
    if salt is not None:
        args["extra_body"] = {"cache_salt": salt}
    args.update(kw)
    if not stream:
        r = client.responses.create(**args)
    else:
        events = list(client.responses.create(**args, stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        head, deltas, tail = events[:4], events[4:-4], events[-4:]
        assert [type(e) for e in head] == [ResponseCreatedEvent, ResponseInProgressEvent,
                                           ResponseOutputItemAddedEvent, ResponseContentPartAddedEvent], events
        assert all(type(e) is ResponseTextDeltaEvent for e in deltas), events
        assert [type(e) for e in tail[:3]] == [ResponseTextDoneEvent, ResponseContentPartDoneEvent,
                                               ResponseOutputItemDoneEvent], events
        assert type(tail[3]) in (ResponseCompletedEvent, ResponseIncompleteEvent)
        r = tail[3].response
        assert head[0].response.status == head[1].response.status == "in_progress"
        assert head[0].response.id == r.id and head[0].response.output == []
        item_id = head[2].item.id
        assert head[2].item.status == "in_progress" and head[2].item.content == []
        assert head[3].part.type == "output_text" and head[3].part.text == ""
        assert all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0
                   for e in [head[3], *deltas, *tail[:2]])
        assert all(e.delta for e in deltas)
        text = "".join(e.delta for e in deltas)
        assert text == tail[0].text == tail[1].part.text == tail[2].item.content[0].text == r.output_text
        assert tail[2].item.id == item_id == r.output[0].id and tail[2].item.status == r.output[0].status
    assert isinstance(r, Response) and r.object == "response" and r.id.startswith("resp_")
    assert r.model == NAME and r.previous_response_id == prev and r.status in ("completed", "incomplete")
    assert len(r.output) == 1
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert len(msg.content) == 1 and msg.content[0].type == "output_text"
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens_details.reasoning_tokens == 0
    assert 0 <= u.input_tokens_details.cached_tokens < u.input_tokens
    return r


def chat_replay(client: openai.OpenAI, messages: list[dict], max_tokens: int = MAX_OUT):
    """The same history through /v1/chat/completions (no conversation_id), temperature 0."""
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, r.usage, r.choices[0].finish_reason


def assert_same_as_chat(client, r: Response, messages: list[dict]):
    text, usage, finish = chat_replay(client, messages)
    assert r.output_text == text, (messages, r.output_text, text)
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert r.status == ("completed" if finish == "stop" else "incomplete")


def run_chain(client, turns=CHAIN, *, stream=False, salt=None, instructions=None, prev=None, history=None):
    """Each turn continues the previous response by id, sending only the new message; returns the responses and
    the full history (what a chat client would resend)."""
    history = list(history or [])
    out = []
    for i, text in enumerate(turns):
        kw = {} if instructions is None else {"instructions": instructions}
        r = create(client, _input(text, i), prev, stream=stream if stream != "alternate" else i % 2 == 1,
                   salt=salt, **kw)
        history += [{"role": "user", "content": text}]
        sys_msg = [] if instructions is None else [{"role": "system", "content": instructions}]
        assert_same_as_chat(client, r, sys_msg + history)
        history += [{"role": "assistant", "content": r.output_text}]
        out.append(r)
        prev = r.id
    return out, history


@pytest.mark.parametrize("stream", [False, True, "alternate"], ids=["nonstream", "stream", "alternate"])
def test_chain_of_five_equals_chat_replay(server, stream):
    client = server.client(KEY)
    responses, history = run_chain(client, stream=stream)
    if test_server.MODEL is None:  # the embedded model recalls what the chain told it
        assert "Zora" in responses[2].output_text and "Zora" in responses[4].output_text, history
    # Every response of the chain is stored and retrievable as it was answered.
    for r in responses:
        got = client.responses.retrieve(r.id)
        assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage
        assert got.previous_response_id == r.previous_response_id and got.status == r.status


def test_instructions_do_not_carry_over(server):
    """As in OpenAI's API: a request's instructions are its own system message; a continuation without
    instructions has none, one with other instructions has those."""
    client = server.client(KEY)
    first = create(client, "My name is Zora.", instructions="Be brief.")
    assert first.instructions == "Be brief."
    assert_same_as_chat(client, first, [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "My name is Zora."}])
    history = [{"role": "user", "content": "My name is Zora."}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "What is my name?"}]
    second = create(client, "What is my name?", first.id)
    assert second.instructions is None
    assert_same_as_chat(client, second, history)
    other = create(client, [{"role": "developer", "content": "Answer."}, {"role": "user", "content": "What is my name?"}],
                   first.id, instructions="Be kind.")
    assert_same_as_chat(client, other, [{"role": "system", "content": "Be kind."}, *history[:2],
                                        {"role": "system", "content": "Answer."}, history[2]])


def test_earlier_output_items_as_input(server):
    """A client may resend an output message (type message, role assistant, output_text parts) as input."""
    client = server.client(KEY)
    first = create(client, "My name is Zora.", store=False)
    item = first.output[0].model_dump(exclude_none=True)
    r = create(client, [{"role": "user", "content": "My name is Zora."}, item,
                        {"role": "user", "content": "What is my name?"}])
    assert_same_as_chat(client, r, [{"role": "user", "content": "My name is Zora."},
                                    {"role": "assistant", "content": first.output_text},
                                    {"role": "user", "content": "What is my name?"}])


def test_retrieve_and_delete(server):
    client = server.client(KEY)
    a = create(client, "My name is Zora.")
    b = create(client, "What is 3+4?", a.id)
    got = client.responses.retrieve(a.id)
    assert got.model_dump() == a.model_dump()
    assert client.responses.delete(a.id) is None
    with server.http(KEY) as http:
        gone = http.get(f"/v1/responses/{a.id}")
        assert_openai_error(gone, 404, "response_not_found")
        assert_openai_error(http.delete(f"/v1/responses/{a.id}"), 404, "response_not_found")
        body = {"model": NAME, "input": "x", "previous_response_id": a.id}
        err = http.post("/v1/responses", json=body)
        assert_openai_error(err, 404, "response_not_found")
        assert err.json()["error"]["param"] == "previous_response_id"
        # The raw DELETE answer.
        tmp = create(client, "Say hello.")
        d = http.delete(f"/v1/responses/{tmp.id}")
        assert d.status_code == 200 and d.json() == {"id": tmp.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(a.id)
    with pytest.raises(openai.NotFoundError):
        create(client, "What is my name?", a.id)
    # Its continuation still holds the whole history: deleting a removes a, not b's past.
    c = create(client, "What is my name?", b.id)
    assert_same_as_chat(client, c, [{"role": "user", "content": "My name is Zora."},
                                    {"role": "assistant", "content": a.output_text},
                                    {"role": "user", "content": "What is 3+4?"},
                                    {"role": "assistant", "content": b.output_text},
                                    {"role": "user", "content": "What is my name?"}])


def test_salt_isolation(server):
    client = server.client(KEY)
    a = create(client, "My name is Zora.", salt="tenant-a")
    with server.http(KEY) as http:
        url = f"/v1/responses/{a.id}"
        assert http.get(url, params={"cache_salt": "tenant-a"}).json()["id"] == a.id
        assert http.get(url, headers={"X-Cache-Salt": "tenant-a"}).status_code == 200
        wrong = http.get(url, params={"cache_salt": "tenant-b"})
        assert_openai_error(wrong, 404, "response_not_found")
        assert_openai_error(http.get(url), 404)  # no salt is another tenant too
        # A wrong salt is indistinguishable from an id that never existed.
        assert wrong.json()["error"]["message"].replace(a.id, "X") == \
            http.get("/v1/responses/resp_never", params={"cache_salt": "tenant-b"}).json()["error"]["message"] \
            .replace("resp_never", "X")
        assert_openai_error(http.delete(url, params={"cache_salt": "tenant-b"}), 404)
        # The header wins over the query parameter (a gateway's header is never overridden by its client).
        assert_openai_error(http.get(url, params={"cache_salt": "tenant-a"}, headers={"X-Cache-Salt": "x"}), 404)
        assert http.get(url, params={"cache_salt": "x"}, headers={"X-Cache-Salt": "tenant-a"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        create(client, "What is my name?", a.id, salt="tenant-b")
    with pytest.raises(openai.NotFoundError):
        create(client, "What is my name?", a.id)
    # The salt may come as the X-Cache-Salt header, as for chat completions.
    b = create(client, "What is my name?", a.id, extra_headers={"X-Cache-Salt": "tenant-a"})
    assert_same_as_chat(client, b, [{"role": "user", "content": "My name is Zora."},
                                    {"role": "assistant", "content": a.output_text},
                                    {"role": "user", "content": "What is my name?"}])
    assert client.responses.retrieve(b.id, extra_headers={"X-Cache-Salt": "tenant-a"}).id == b.id
    assert client.responses.delete(b.id, extra_query={"cache_salt": "tenant-a"}) is None


def test_store_false(server):
    client = server.client(KEY)
    for stream in (False, True):
        r = create(client, "My name is Zora.", store=False, stream=stream)
        assert r.model_dump().get("store") is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            create(client, "What is my name?", r.id)
    # A stored response continued with store=false: the new one is not stored, the old one stays.
    a = create(client, "My name is Zora.")
    b = create(client, "What is my name?", a.id, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(b.id)
    assert client.responses.retrieve(a.id).id == a.id


def test_incomplete_and_logprobs(server):
    client = server.client(KEY)
    for stream in (False, True):
        r = create(client, "Tell me a long story.", max_output_tokens=3, stream=stream, extra_body={"ignore_eos": True})
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3
    r = create(client, "Say hello.", include=["message.output_text.logprobs"], top_logprobs=2)
    lps = r.output[0].content[0].logprobs
    assert len(lps) == r.usage.output_tokens > 0
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.logprob == pytest.approx(max(t.logprob for t in lp.top_logprobs), abs=1e-5)  # greedy
    plain = create(client, "Say hello.")
    assert plain.output[0].content[0].logprobs == [] and plain.output_text == r.output_text


_R = "/v1/responses"


def _body(**over):
    body = {"model": NAME, "input": "hi", "max_output_tokens": 4, "temperature": 0}
    body.update(over)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()

BAD_REQUESTS = [
    ("missing-input", _body(input=_DROP), 400, None),
    ("input-number", _body(input=5), 400, None),
    ("input-empty-list", _body(input=[]), 400, None),
    ("input-item-not-object", _body(input=["hi"]), 400, None),
    ("input-function-call", _body(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]),
     400, None),
    ("input-item-reference", _body(input=[{"type": "item_reference", "id": "msg_1"}]), 400, None),
    ("input-unknown-role", _body(input=[{"role": "wizard", "content": "hi"}]), 400, None),
    ("input-image", _body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), 400,
     None),
    ("input-refusal", _body(input=[{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]), 400,
     None),
    ("input-content-number", _body(input=[{"role": "user", "content": 3}]), 400, None),
    ("max-output-tokens-0", _body(max_output_tokens=0), 400, None),
    ("temperature-5", _body(temperature=5), 400, None),
    ("top-p-0", _body(top_p=0), 400, None),
    ("tools", _body(tools=[{"type": "function", "name": "f", "parameters": {}}]), 400, None),
    ("tool-choice-required", _body(tool_choice="required"), 400, None),
    ("text-json-schema", _body(text={"format": {"type": "json_schema", "name": "x", "schema": {}}}), 400, None),
    ("text-verbosity-low", _body(text={"verbosity": "low"}), 400, None),
    ("reasoning-effort", _body(reasoning={"effort": "high"}), 400, None),
    ("truncation-auto", _body(truncation="auto"), 400, None),
    ("background", _body(background=True), 400, None),
    ("include-unknown", _body(include=["file_search_call.results"]), 400, None),
    ("top-logprobs-without-include", _body(top_logprobs=2), 400, None),
    ("conversation", _body(conversation="conv_1"), 400, None),
    ("prompt-template", _body(prompt={"id": "pmpt_1"}), 400, None),
    ("unknown-field", _body(frobnicate=True), 400, None),
    ("chat-max-tokens", _body(max_tokens=5), 400, None),
    ("empty-cache-salt", _body(cache_salt=""), 400, None),
    ("stream-object", _body(stream={"yes": 1}), 400, None),
    ("prompt-too-long", _body(input="x" * (test_server.MAX_MODEL_LEN + 50)), 400, "context_length_exceeded"),
    ("unknown-model", _body(model="gpt-nope"), 404, "model_not_found"),
    ("unknown-previous", _body(previous_response_id="resp_nope"), 404, "response_not_found"),
]


@pytest.mark.parametrize("body,status,code", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, body, status, code):
    with server.http(KEY) as http:
        assert_openai_error(http.post(_R, json=body), status, code)
        assert http.get("/health").status_code == 200


def test_other_errors_and_accepted_fields(server):
    with server.http(KEY) as http:
        assert_openai_error(http.get(f"{_R}/resp_unknown"), 404, "response_not_found")
        assert_openai_error(http.delete(f"{_R}/resp_unknown"), 404, "response_not_found")
        assert_openai_error(http.get(f"{_R}/resp_unknown/input_items"), 404)
        assert_openai_error(http.put(_R, json=_body()), 405)
        with httpx.Client(base_url=server.url, timeout=30) as anon:
            assert_openai_error(anon.post(_R, json=_body()), 401, "invalid_api_key")
        ok = http.post(_R, json=_body())
        assert_openai_error(http.get(f"{_R}/{ok.json()['id']}", params={"stream": "true"}), 400)
    # Fields that change nothing in the output are accepted (and echoed where OpenAI echoes them).
    client = server.client(KEY)
    plain = create(client, "Say hello.")
    r = create(client, "Say hello.", metadata={"k": "v"}, user="u1", safety_identifier="s1", prompt_cache_key="p",
               service_tier="auto", parallel_tool_calls=False, tools=[], tool_choice="none", truncation="disabled",
               text={"format": {"type": "text"}}, include=["reasoning.encrypted_content"],
               stream_options={"include_obfuscation": False}, store=True, background=False)
    assert r.output_text == plain.output_text and r.usage.input_tokens == plain.usage.input_tokens
    assert r.metadata == {"k": "v"} and r.user == "u1" and r.parallel_tool_calls is False


# --------------------------------------------------------------------------------------------------
# Durability: stored responses across a crash with --cache-dir (in its state database) (keep these last: they restart the
# module's server)
# --------------------------------------------------------------------------------------------------

def test_restart_keeps_stored_responses(server, cache_dir):
    client = server.client(KEY)
    responses, history = run_chain(client, CHAIN[:2], salt="tenant-d")
    gone = create(client, "Say hello.", salt="tenant-d")
    client.responses.delete(gone.id, extra_query={"cache_salt": "tenant-d"})
    unstored = create(client, "Say hello.", salt="tenant-d", store=False)
    server.stop(signal.SIGKILL)  # stored in the state database before they were answered: a crash keeps them
    path = cache_dir / "state.db"
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    with StateStore.open(str(cache_dir)) as db:
        assert db.get_response(responses[-1].id, touch=False) is not None
        assert db.get_response(gone.id, touch=False) is None and db.get_response(unstored.id, touch=False) is None
    assert not (cache_dir / FILENAME).exists()
    # What an older server saved in responses.json is moved into the state database at start.
    legacy = ResponsesStore()
    old = dict(responses[0].model_dump(), id="resp_saved_by_an_older_server")
    legacy.add(old["id"], "tenant-d", old, None, history[:2])
    legacy.save(str(cache_dir))
    server.start()
    client = server.client(KEY)
    got = client.responses.retrieve(responses[-1].id, extra_query={"cache_salt": "tenant-d"})
    assert got.model_dump() == responses[-1].model_dump()
    assert client.responses.retrieve(old["id"], extra_query={"cache_salt": "tenant-d"}).model_dump() == old
    assert not (cache_dir / FILENAME).exists()
    for rid in (gone.id, unstored.id):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(rid, extra_query={"cache_salt": "tenant-d"})
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(responses[-1].id)  # still only for its tenant
    # Continuing from the restored response answers what the fresh replay of its history answers.
    nxt = create(client, CHAIN[2], responses[-1].id, salt="tenant-d")
    assert_same_as_chat(client, nxt, history + [{"role": "user", "content": CHAIN[2]}])
    if test_server.MODEL is None:
        assert "Zora" in nxt.output_text


# --------------------------------------------------------------------------------------------------
# Cache hits of a chain: enabled when the token-addressed checkpoints (issue 10 items 1-3) land
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_chain_cached_tokens_grow_and_survive_restart(server, stream):
    """A previous_response_id chain is sent to the engine as its full history without a conversation_id: from
    the second response on, the rendered prompt starts with the previous response's committed tokens, so
    cached_tokens covers at least the previous input and output (less the few tokens the template re-renders)
    and grows every turn; after a restart, continuing a stored response still hits."""
    client = server.client(KEY)
    salt = f"hits-{stream}"
    responses, history = run_chain(client, stream=stream, salt=salt)
    assert responses[0].usage.input_tokens_details.cached_tokens == 0
    for prev, cur in zip(responses, responses[1:]):
        cached = cur.usage.input_tokens_details.cached_tokens
        assert cached > prev.usage.input_tokens_details.cached_tokens
        assert cached >= prev.usage.input_tokens + prev.usage.output_tokens - 4, (prev.usage, cur.usage)
    assert server.stop(signal.SIGTERM) == 0, server.log_tail()
    server.start()
    client = server.client(KEY)
    last = responses[-1]
    nxt = create(client, "What is my name?", last.id, salt=salt)
    assert nxt.usage.input_tokens_details.cached_tokens >= last.usage.input_tokens + last.usage.output_tokens - 4
    assert_same_as_chat(client, nxt, history + [{"role": "user", "content": "What is my name?"}])
