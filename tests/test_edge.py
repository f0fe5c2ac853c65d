"""The edge of the server (issue 11): validation in one place with the ranges the engine can hold, body read
timeouts, /tokenize and /detokenize behind the key, the cache_salt rules, and the table of malformed requests.

One server (module-scoped, `python -m serving` on loopback): keyed, `--require-cache-salt`, a short
`--request-body-timeout`, and `--log-level debug` (uvicorn's access log on), so the last test can check that no
salt this module sent was ever written to the log.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from serving.openai.fields import MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS
from serving.request import INT32_MAX
from test_server import (_CHAT, _CMPL, _DROP, COMMON, KEY, MAX_MODEL_LEN, MAX_REQUEST_BYTES, NAME, ServerProcess,  # noqa: F401
                         _chat, assert_openai_error, chat_turn, server_env, workdir)

BODY_TIMEOUT = 2.0
SALT = "s4lt-edge"  # every salt this module sends starts with "s4lt": none may reach the server's log
_R, _TOK, _DETOK = "/v1/responses", "/tokenize", "/detokenize"
BIG_ID = INT32_MAX  # an int32 no vocabulary reaches


@pytest.fixture(scope="module")
def edge(workdir, server_env):
    s = ServerProcess("edge", workdir, [*COMMON, "--cache-mode", "exact", "--api-key", KEY,
                                        "--request-body-timeout", str(BODY_TIMEOUT), "--require-cache-salt",
                                        "--log-level", "debug"], server_env).start()
    yield s
    s.stop()


def _raw(obj, **headers) -> dict:
    """A body sent as the JSON text json.dumps writes: lone surrogates go out as \\ud800 escapes."""
    return {"content": json.dumps(obj).encode(), "headers": {"content-type": "application/json", **headers}}


def _cb(**over) -> dict:
    """A chat completion body (test_server's _chat gives request kwargs)."""
    return _chat(**over)["json"]


def _cmpl(**over) -> dict:
    body = {"model": NAME, "prompt": "hi", "max_tokens": 4, "temperature": 0}
    body.update(over)
    return {k: v for k, v in body.items() if v is not _DROP}


def _resp(**over) -> dict:
    body = {"model": NAME, "input": "hi", "max_output_tokens": 4, "temperature": 0}
    body.update(over)
    return {k: v for k, v in body.items() if v is not _DROP}


def _msgs(content="hi", n=1, **extra) -> list[dict]:
    return [{"role": "user", "content": content, **extra}] * n


# Integers out of the engine's ranges, token ids out of the vocabulary, logit_bias: (name, path, body, param).
OUT_OF_RANGE = [
    ("chat-top-k-2^31", _CHAT, _cb(top_k=2 ** 31), "top_k"),
    ("chat-top-k-2^64", _CHAT, _cb(top_k=2 ** 64), "top_k"),
    ("chat-top-k--2", _CHAT, _cb(top_k=-2), "top_k"),
    ("chat-seed-2^64", _CHAT, _cb(seed=2 ** 64), "seed"),
    ("chat-seed-below-int64", _CHAT, _cb(seed=-(2 ** 63) - 1), "seed"),
    ("chat-max-tokens-2^31", _CHAT, _cb(max_tokens=2 ** 31), "max_tokens"),
    ("chat-max-completion-tokens-2^31", _CHAT, _cb(max_completion_tokens=2 ** 31), "max_completion_tokens"),
    ("chat-n-2^31", _CHAT, _cb(n=2 ** 31), "n"),
    ("chat-top-logprobs-above-engine", _CHAT, _cb(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1),
     "top_logprobs"),
    ("chat-top-logprobs-2^31", _CHAT, _cb(logprobs=True, top_logprobs=2 ** 31), "top_logprobs"),
    ("chat-top-logprobs-negative", _CHAT, _cb(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("chat-stop-token-id-2^31", _CHAT, _cb(stop_token_ids=[1, 2 ** 31]), "stop_token_ids[1]"),
    ("chat-stop-token-id-2^64", _CHAT, _cb(stop_token_ids=[2 ** 64]), "stop_token_ids[0]"),
    ("chat-stop-token-id-negative", _CHAT, _cb(stop_token_ids=[-1]), "stop_token_ids[0]"),
    ("chat-stop-token-id-beyond-vocab", _CHAT, _cb(stop_token_ids=[BIG_ID]), "stop_token_ids"),
    ("chat-logit-bias-beyond-vocab", _CHAT, _cb(logit_bias={str(BIG_ID): 10}), "logit_bias"),
    ("chat-logit-bias-huge-key", _CHAT, _cb(logit_bias={str(2 ** 64): 1}), "logit_bias"),
    ("completion-top-k-2^31", _CMPL, _cmpl(top_k=2 ** 31), "top_k"),
    ("completion-seed-2^64", _CMPL, _cmpl(seed=2 ** 64), "seed"),
    ("completion-max-tokens-2^31", _CMPL, _cmpl(max_tokens=2 ** 31), "max_tokens"),
    ("completion-logprobs-above-engine", _CMPL, _cmpl(logprobs=MAX_TOP_LOGPROBS + 1), "logprobs"),
    ("completion-logprobs-negative", _CMPL, _cmpl(logprobs=-1), "logprobs"),
    ("completion-stop-token-id-2^31", _CMPL, _cmpl(stop_token_ids=[2 ** 31]), "stop_token_ids[0]"),
    ("completion-logit-bias-out-of-range", _CMPL, _cmpl(logit_bias={"1": -101}), "logit_bias"),
    ("completion-token-beyond-vocab", _CMPL, _cmpl(prompt=[1, BIG_ID]), "prompt"),
    ("completion-token-2^63", _CMPL, _cmpl(prompt=[2 ** 63]), "prompt"),
    ("completion-token-negative", _CMPL, _cmpl(prompt=[5, -1]), "prompt"),
    ("completion-nested-token-2^40", _CMPL, _cmpl(prompt=[[1, 2 ** 40]]), "prompt"),
    ("responses-top-k-2^31", _R, _resp(top_k=2 ** 31), "top_k"),
    ("responses-seed-2^64", _R, _resp(seed=2 ** 64), "seed"),
    ("responses-max-output-tokens-2^31", _R, _resp(max_output_tokens=2 ** 31), "max_output_tokens"),
    ("responses-top-logprobs-above-engine", _R,
     _resp(include=["message.output_text.logprobs"], top_logprobs=MAX_TOP_LOGPROBS + 1), "top_logprobs"),
    ("responses-stop-token-id-2^31", _R, _resp(stop_token_ids=[2 ** 31]), "stop_token_ids[0]"),
    ("responses-max-tool-calls-2^31", _R, _resp(max_tool_calls=2 ** 31), "max_tool_calls"),
    ("detokenize-beyond-vocab", _DETOK, {"tokens": [1, BIG_ID]}, "tokens"),
    ("detokenize-2^31", _DETOK, {"tokens": [2 ** 31]}, "tokens[0]"),
]


def _case(name, method, path, kwargs, status, code=None, param=...):
    return (name, method, path, kwargs, status, code, param)


_LONE = "\ud800"
_WRONG_KEY = {"headers": {"Authorization": "Bearer wrong"}}

MALFORMED = [
    # ---- the 45 cases of the first table (tests/test_server.py before issue 11)
    *[(*c, ...) for c in [
        ("bad-json", "POST", _CHAT, {"content": b'{"messages": [', "headers": {"content-type": "application/json"}}, 400,
         None),
        ("body-not-object", "POST", _CHAT, {"json": [1, 2, 3]}, 400, None),
        ("missing-messages", "POST", _CHAT, _chat(messages=_DROP), 400, None),
        ("messages-not-list", "POST", _CHAT, _chat(messages="hello"), 400, None),
        ("empty-messages", "POST", _CHAT, _chat(messages=[]), 400, None),
        ("message-not-object", "POST", _CHAT, _chat(messages=["hi"]), 400, None),
        ("unknown-role", "POST", _CHAT, _chat(messages=[{"role": "wizard", "content": "hi"}]), 400, None),
        ("missing-role", "POST", _CHAT, _chat(messages=[{"content": "hi"}]), 400, None),
        ("content-number", "POST", _CHAT, _chat(messages=[{"role": "user", "content": 5}]), 400, None),
        ("content-image-part", "POST", _CHAT,
         _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, None),
        ("negative-max-tokens", "POST", _CHAT, _chat(max_tokens=-1), 400, None),
        ("zero-max-tokens", "POST", _CHAT, _chat(max_tokens=0), 400, None),
        ("max-tokens-string", "POST", _CHAT, _chat(max_tokens="many"), 400, None),
        ("zero-max-completion-tokens", "POST", _CHAT, _chat(max_completion_tokens=0), 400, None),
        ("temperature-5", "POST", _CHAT, _chat(temperature=5), 400, None),
        ("temperature-negative", "POST", _CHAT, _chat(temperature=-0.1), 400, None),
        ("top-p-0", "POST", _CHAT, _chat(top_p=0), 400, None),
        ("top-p-above-1", "POST", _CHAT, _chat(top_p=1.5), 400, None),
        ("top-k-0", "POST", _CHAT, _chat(top_k=0), 400, None),
        ("min-p-above-1", "POST", _CHAT, _chat(min_p=1.5), 400, None),
        ("n-17", "POST", _CHAT, _chat(n=17), 400, None),
        ("stop-number", "POST", _CHAT, _chat(stop=5), 400, None),
        ("stop-list-of-numbers", "POST", _CHAT, _chat(stop=[1, 2]), 400, None),
        ("stop-token-ids-strings", "POST", _CHAT, _chat(stop_token_ids=["a"]), 400, None),
        ("stream-object", "POST", _CHAT, _chat(stream={"yes": 1}), 400, None),
        ("empty-cache-salt", "POST", _CHAT, _chat(conversation_id="c", cache_salt=""), 400, None),
        ("long-cache-salt", "POST", _CHAT, _chat(conversation_id="c", cache_salt="s" * 257), 400, None),
        ("empty-conversation-id", "POST", _CHAT, _chat(conversation_id=""), 400, None),
        ("long-conversation-id", "POST", _CHAT, _chat(conversation_id="c" * 257), 400, None),
        ("conversation-id-number", "POST", _CHAT, _chat(conversation_id=123), 400, None),
        ("top-logprobs-21", "POST", _CHAT, _chat(logprobs=True, top_logprobs=21), 400, None),
        ("prompt-too-long", "POST", _CHAT, _chat(messages=[{"role": "user", "content": "x" * (MAX_MODEL_LEN + 50)}]),
         400, "context_length_exceeded"),
        ("unknown-model", "POST", _CHAT, _chat(model="gpt-nope"), 404, "model_not_found"),
        ("body-too-large", "POST", _CHAT, _chat(messages=[{"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 10)}]),
         413, None),
        ("completion-missing-prompt", "POST", _CMPL, {"json": {"model": NAME, "max_tokens": 4}}, 400, None),
        ("completion-empty-prompt", "POST", _CMPL, {"json": {"model": NAME, "prompt": ""}}, 400, None),
        ("completion-token-out-of-range", "POST", _CMPL, {"json": {"model": NAME, "prompt": [1, 999999]}}, 400, None),
        ("completion-prompt-too-long", "POST", _CMPL, {"json": {"model": NAME, "prompt": "y" * (MAX_MODEL_LEN + 5)}},
         400, "context_length_exceeded"),
        ("completion-n-3", "POST", _CMPL, {"json": {"model": NAME, "prompt": "hi", "n": 3}}, 400, None),
        ("tokenize-nothing", "POST", "/tokenize", {"json": {}}, 400, None),
        ("detokenize-strings", "POST", "/detokenize", {"json": {"tokens": ["a"]}}, 400, None),
        ("conversation-empty-salt", "GET", "/v1/conversations/c?cache_salt=", {}, 400, None),
        ("conversation-unknown", "GET", "/v1/conversations/never-seen?cache_salt=t", {}, 404, None),
        ("unknown-route", "GET", "/v1/nothing-here", {}, 404, None),
        ("wrong-method", "GET", _CHAT, {}, 405, None),
    ]],
    # ---- out-of-range integers and token ids (also sent while streams run: test_out_of_range_*)
    *[_case(name, "POST", path, {"json": body}, 400, "invalid_value", param) for name, path, body, param in OUT_OF_RANGE],
    # ---- strings: UTF-8 text only (a lone surrogate escape is 400, never 500)
    _case("chat-content-lone-surrogate", "POST", _CHAT, _raw(_cb(messages=_msgs(_LONE))), 400, None,
          "messages[0].content"),
    _case("chat-content-part-lone-surrogate", "POST", _CHAT,
          _raw(_cb(messages=_msgs([{"type": "text", "text": "a" + _LONE}]))), 400, None,
          "messages[0].content[0].text"),
    _case("chat-name-lone-surrogate", "POST", _CHAT, _raw(_cb(messages=_msgs(name=_LONE))), 400, None,
          "messages[0].name"),
    _case("chat-stop-lone-surrogate", "POST", _CHAT, _raw(_cb(stop=_LONE)), 400, None, "stop"),
    _case("chat-stop-list-lone-surrogate", "POST", _CHAT, _raw(_cb(stop=["ok", "\udc00"])), 400, None,
          "stop[1]"),
    _case("chat-key-lone-surrogate", "POST", _CHAT, _raw({**_cb(), _LONE: 1}), 400),
    _case("completion-prompt-lone-surrogate", "POST", _CMPL, _raw(_cmpl(prompt="x" + _LONE)), 400, None, "prompt"),
    _case("responses-input-lone-surrogate", "POST", _R,
          _raw(_resp(input=[{"role": "user", "content": _LONE}])), 400, None, "input[0].content"),
    _case("responses-instructions-lone-surrogate", "POST", _R, _raw(_resp(instructions=_LONE)), 400, None,
          "instructions"),
    _case("responses-metadata-lone-surrogate", "POST", _R, _raw(_resp(metadata={"k": _LONE})), 400, None,
          "metadata.k"),
    _case("tokenize-lone-surrogate", "POST", _TOK, _raw({"prompt": _LONE}), 400, None, "prompt"),
    _case("tokenize-messages-lone-surrogate", "POST", _TOK, _raw({"messages": _msgs("ab" + _LONE)}), 400, None,
          "messages[0].content"),
    _case("body-not-utf8", "POST", _CHAT, {"content": b'{"messages": [{"role": "user", "content": "\xff"}]}',
                                           "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    _case("temperature-nan", "POST", _CHAT, {"content": b'{"messages": [{"role": "user", "content": "hi"}], '
                                                        b'"temperature": NaN}'}, 400, None, "temperature"),
    # ---- ids and salts: printable, bounded
    _case("conversation-id-newline", "POST", _CHAT, _chat(conversation_id="a\nb", cache_salt=SALT), 400, None,
          "conversation_id"),
    _case("conversation-id-tab", "POST", _CHAT, _chat(conversation_id="a\tb", cache_salt=SALT), 400, None,
          "conversation_id"),
    _case("cache-salt-nul", "POST", _CHAT, _chat(conversation_id="c", cache_salt=SALT + "\x00"), 400, None,
          "cache_salt"),
    _case("cache-salt-header-not-utf8", "POST", _CHAT,
          {**_chat(conversation_id="c"), "headers": {"X-Cache-Salt": b"s4lt\xff\xfe"}}, 400, None, "cache_salt"),
    _case("cache-salt-header-tab", "POST", _CHAT,
          {**_chat(conversation_id="c"), "headers": {"X-Cache-Salt": "s4lt\tx"}}, 400, None, "cache_salt"),
    _case("completion-conversation-id-newline", "POST", _CMPL, {"json": _cmpl(conversation_id="\n", cache_salt=SALT)},
          400, None, "conversation_id"),
    _case("previous-response-id-newline", "POST", _R, {"json": _resp(previous_response_id="resp_1\n",
                                                                     cache_salt=SALT)}, 400, None,
          "previous_response_id"),
    _case("previous-response-id-long", "POST", _R, {"json": _resp(previous_response_id="r" * 257, cache_salt=SALT)},
          400, None, "previous_response_id"),
    # (a newline never matches the route: no such id can be created, so there is nothing to find)
    _case("get-conversation-id-newline", "GET", f"/v1/conversations/a%0Ab?cache_salt={SALT}", {}, 404, "not_found"),
    _case("delete-conversation-id-control", "DELETE", "/v1/conversations/a%01b", {"headers": {"X-Cache-Salt": SALT}},
          400, None, "conversation_id"),
    _case("get-conversation-salt-control", "GET", "/v1/conversations/c?cache_salt=s4lt%0A", {}, 400, None,
          "cache_salt"),
    # ---- --require-cache-salt: an id without a salt is refused
    _case("chat-conversation-without-salt", "POST", _CHAT, _chat(conversation_id="c"), 400, "cache_salt_required",
          "cache_salt"),
    _case("completion-conversation-without-salt", "POST", _CMPL, {"json": _cmpl(conversation_id="c")}, 400,
          "cache_salt_required", "cache_salt"),
    _case("responses-previous-without-salt", "POST", _R, {"json": _resp(previous_response_id="resp_1")}, 400,
          "cache_salt_required", "cache_salt"),
    _case("get-conversation-without-salt", "GET", "/v1/conversations/c", {}, 400, "cache_salt_required"),
    _case("delete-conversation-without-salt", "DELETE", "/v1/conversations/c", {}, 400, "cache_salt_required"),
    _case("list-conversations-without-salt", "GET", "/v1/conversations", {}, 400, "cache_salt_required"),
    # ---- counts and sizes
    _case("too-many-messages", "POST", _CHAT, _chat(messages=_msgs("x", MAX_MESSAGES + 1)), 400, None, "messages"),
    _case("too-many-content-parts", "POST", _CHAT,
          _chat(messages=_msgs([{"type": "text", "text": "x"}] * (MAX_CONTENT_PARTS + 1))), 400, None,
          "messages[0].content"),
    _case("too-many-stop-strings", "POST", _CHAT, _chat(stop=["x"] * 17), 400, None, "stop"),
    _case("stop-string-too-long", "POST", _CHAT, _chat(stop="x" * (MAX_STOP_CHARS + 1)), 400, None, "stop"),
    _case("too-many-stop-token-ids", "POST", _CHAT, _chat(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1)), 400, None,
          "stop_token_ids"),
    _case("tokenize-too-many-messages", "POST", _TOK, {"json": {"messages": _msgs("x", MAX_MESSAGES + 1)}}, 400,
          None, "messages"),
    _case("responses-too-many-input-items", "POST", _R, {"json": _resp(input=_msgs("x", MAX_MESSAGES + 1))}, 400,
          None, "input"),
    # ---- refused, never ignored
    _case("presence-penalty-out-of-range", "POST", _CHAT, _chat(presence_penalty=2.5), 400, None, "presence_penalty"),
    _case("unknown-field", "POST", _CHAT, _chat(guided_whitespace_pattern=" "), 400, None, "guided_whitespace_pattern"),
    _case("completion-echo", "POST", _CMPL, {"json": _cmpl(echo=True)}, 400, None, "echo"),
    # ---- /tokenize and /detokenize are behind the key
    _case("tokenize-wrong-key", "POST", _TOK, {"json": {"prompt": "hi"}, **_WRONG_KEY}, 401, "invalid_api_key"),
    _case("detokenize-wrong-key", "POST", _DETOK, {"json": {"tokens": [104]}, **_WRONG_KEY}, 401, "invalid_api_key"),
]


def _ids(table):
    return [c[0] for c in table]


def test_table_size():
    assert len(MALFORMED) >= 60 and len(set(_ids(MALFORMED))) == len(MALFORMED)


@pytest.mark.parametrize("method,path,kwargs,status,code,param", [c[1:] for c in MALFORMED], ids=_ids(MALFORMED))
def test_malformed_request(edge, method, path, kwargs, status, code, param):
    with edge.http(KEY) as http:
        resp = http.request(method, path, **kwargs)
        assert_openai_error(resp, status, code)
        if param is not ...:
            assert resp.json()["error"]["param"] == param, resp.json()
        assert http.get("/health").status_code == 200


def test_still_serves_after_errors(edge):
    # Runs after the table: a normal turn works.
    t = chat_turn(edge.client(KEY), [{"role": "user", "content": "Are you alive?"}], max_tokens=4, ignore_eos=True)
    assert t.completion_tokens == 4


# --------------------------------------------------------------------------------------------------
# One bad request never hurts another
# --------------------------------------------------------------------------------------------------

STREAM_TOKENS = 300


class _Stream(threading.Thread):
    """A streamed chat completion read to its end in a thread: events, text, finish reason, usage."""

    def __init__(self, srv: ServerProcess, prompt: str):
        super().__init__(daemon=True)
        self.srv, self.prompt = srv, prompt
        self.started, self.finished = threading.Event(), threading.Event()
        self.status, self.text, self.finish, self.usage, self.errors, self.done = None, "", None, None, [], False

    def run(self):
        body = {"model": NAME, "messages": _msgs(self.prompt), "max_tokens": STREAM_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self.srv.http(KEY) as http, http.stream("POST", _CHAT, json=body) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        break
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        self.errors.append(ev["error"])
                        continue
                    if ev.get("usage"):
                        self.usage = ev["usage"]
                    for c in ev.get("choices", []):
                        self.text += c["delta"].get("content") or ""
                        self.finish = c["finish_reason"] or self.finish
                        if self.text:
                            self.started.set()
        except Exception as e:  # reported by the test
            self.errors.append(repr(e))
        finally:
            self.started.set()
            self.finished.set()


def test_out_of_range_fields_leave_other_streams_alone(edge):
    """Each out-of-range field is a 400 at the edge, sent while 3 streams run: they finish with their whole
    output (the bad requests never reach the engine's batch)."""
    streams = [_Stream(edge, p) for p in ("Tell me a story.", "Count to twenty.", "What is a cache?")]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(120), "a stream produced nothing"
    with edge.http(KEY) as http:
        for name, path, body, param in OUT_OF_RANGE:
            resp = http.post(path, json=body)
            assert_openai_error(resp, 400, "invalid_value")
            assert resp.json()["error"]["param"] == param, (name, resp.json())
        assert not any(s.finished.is_set() for s in streams), "the streams ended before the bad requests were sent"
    for s in streams:
        assert s.finished.wait(300)
        assert (s.status, s.errors, s.done, s.finish) == (200, [], True, "length"), s.prompt
        assert s.usage["completion_tokens"] == STREAM_TOKENS and s.text


# --------------------------------------------------------------------------------------------------
# Bodies that stall are dropped
# --------------------------------------------------------------------------------------------------

def _stalled(url: str, body_head: bytes, headers: str) -> tuple[float, bytes]:
    """Send a request's headers and the start of its body, then nothing: (seconds until the server closed the
    connection, what it answered)."""
    parts = urlsplit(url)
    head = (f"POST {_CHAT} HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{headers}\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=BODY_TIMEOUT + 20) as sock:
        sock.sendall(head + body_head)
        t0, data = time.monotonic(), b""
        while chunk := sock.recv(65536):  # a server that never closes the connection: socket.timeout
            data += chunk
        return time.monotonic() - t0, data


def test_stalled_bodies_are_dropped_within_the_timeout(edge):
    results = {}
    cases = {"content-length": (b'{"messages":', "Content-Length: 1000\r\n"),
             "headers-only": (b"", "Content-Length: 1000\r\n"),
             "chunked": (b'c\r\n{"messages":\r\n', "Transfer-Encoding: chunked\r\n")}

    def stall(name):
        results[name] = _stalled(edge.url, *cases[name])

    threads = [threading.Thread(target=stall, args=(n,), daemon=True) for n in cases]
    for t in threads:
        t.start()
    # The server keeps answering while the three connections stall.
    with edge.http(KEY) as http:
        assert http.get("/health").status_code == 200
        t = chat_turn(edge.client(KEY), _msgs("Still there?"), max_tokens=3, ignore_eos=True)
        assert t.completion_tokens == 3
    for t in threads:
        t.join(BODY_TIMEOUT + 30)
    assert set(results) == set(cases)
    for name, (elapsed, data) in results.items():
        assert BODY_TIMEOUT - 0.5 <= elapsed <= BODY_TIMEOUT + 5, (name, elapsed)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), (name, data)
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and err["type"] == "invalid_request_error", err
    with edge.http(KEY) as http:
        assert http.get("/health").status_code == 200
        assert http.post(_TOK, json={"prompt": "hi"}).json()["tokens"]


# --------------------------------------------------------------------------------------------------
# /tokenize and /detokenize behind the key; cache_salt rules
# --------------------------------------------------------------------------------------------------

def test_tokenize_and_detokenize_need_the_key(edge):
    with httpx.Client(base_url=edge.url, timeout=30) as anon:
        assert_openai_error(anon.post(_TOK, json={"prompt": "hi"}), 401, "invalid_api_key")
        assert_openai_error(anon.post(_DETOK, json={"tokens": [104, 105]}), 401, "invalid_api_key")
        assert anon.get("/health").status_code == 200  # health, version and metrics stay open
    with edge.http(KEY) as http:
        ids = http.post(_TOK, json={"prompt": "hi"}).json()["tokens"]
        assert http.post(_DETOK, json={"tokens": ids}).json() == {"prompt": "hi"}
        chat = http.post(_TOK, json={"messages": _msgs("hi", 3)})
        assert chat.status_code == 200 and chat.json()["count"] > len(ids)


def test_header_salt_wins_and_ids_need_a_salt(edge):
    client = edge.client(KEY)
    salt_a, salt_b = SALT + "-a", SALT + "-b"
    # The header is the salt when both are given: the turn lands under salt_a.
    r = client.chat.completions.create(model=NAME, messages=_msgs("My name is Zora."), max_tokens=3,
                                       temperature=0, extra_body={"conversation_id": "hdr", "cache_salt": salt_b},
                                       extra_headers={"X-Cache-Salt": salt_a})
    assert r.choices[0].finish_reason in ("stop", "length")
    url = "/v1/conversations/hdr"
    with edge.http(KEY) as http:
        assert http.get(url, headers={"X-Cache-Salt": salt_a}).json()["turns"] == 1
        assert http.get(url, params={"cache_salt": salt_a}).json()["turns"] == 1  # the query parameter works too
        assert http.get(url, params={"cache_salt": salt_b}, headers={"X-Cache-Salt": salt_a}).status_code == 200
        assert_openai_error(http.get(url, headers={"X-Cache-Salt": salt_b}), 404)
        assert_openai_error(http.get(url, params={"cache_salt": salt_a}, headers={"X-Cache-Salt": salt_b}), 404)
        listed = http.get("/v1/conversations", headers={"X-Cache-Salt": salt_a}).json()["data"]
        assert [c["id"] for c in listed] == ["hdr"]
        # --require-cache-salt refuses ids without a salt, not requests without ids
        assert_openai_error(http.post(_CHAT, **_chat(conversation_id="hdr")), 400, "cache_salt_required")
        assert http.post(_CHAT, **_chat()).status_code == 200
        first = http.post(_R, json=_resp())
        assert first.status_code == 200
        assert_openai_error(http.post(_R, json=_resp(previous_response_id=first.json()["id"])), 400,
                            "cache_salt_required")
        salted = http.post(_R, json=_resp(), headers={"X-Cache-Salt": salt_a}).json()
        nxt = http.post(_R, json=_resp(previous_response_id=salted["id"]), headers={"X-Cache-Salt": salt_a})
        assert nxt.status_code == 200 and nxt.json()["previous_response_id"] == salted["id"]
        deleted = http.delete(url, params={"cache_salt": salt_a})
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True


def test_no_salt_in_the_log(edge):
    """Runs last: the server logs at debug level with uvicorn's access log on, and no salt this module sent (in
    bodies, headers or query strings) was written; query-string salts appear as ***."""
    with edge.http(KEY) as http:
        assert http.get("/v1/conversations/gone", params={"cache_salt": SALT + "-query"}).status_code == 404
        assert http.get("/v1/conversations/gone?cAche%5Fsalt=s4lt-odd&x=1").status_code == 400
    deadline = time.monotonic() + 10
    while "cache_salt=***" not in edge.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    log = edge.log_path.read_text(errors="replace")
    assert re.search(r'"GET /v1/conversations/gone\?cache_salt=\*\*\* HTTP/1\.1" 404', log), \
        "uvicorn's access log is off or unredacted"
    assert "s4lt" not in log, [line for line in log.splitlines() if "s4lt" in line][:5]
