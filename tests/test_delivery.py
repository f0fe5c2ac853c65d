"""Two-phase commit at the edge: a turn is committed only when the server has handed the last byte of its answer
to the transport. A client that leaves earlier (after the first chunk, after the headers) leaves no turn
behind; a stream read to [DONE] and a whole body are committed.

What else a stream and a response carry for stock clients: vLLM's `stream_options.continuous_usage_stats` (usage in
every chunk) and the `x-request-id` header."""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from test_server import COMMON, KEY, NAME, ServerProcess, chat_turn, server_env, workdir  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def srv(workdir, server_env):
    s = ServerProcess("delivery", workdir, [*COMMON, "--cache-mode", "exact", "--api-key", KEY], server_env).start()
    yield s
    s.stop()


def _turns(srv, conv, salt) -> int:
    with srv.http(KEY) as http:
        r = http.get(f"/v1/conversations/{conv}", params={"cache_salt": salt})
    return r.json()["turns"] if r.status_code == 200 else 0


def _body(conv, salt, text, stream=True, max_tokens=4, **extra):
    return {"model": NAME, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "conversation_id": conv, "cache_salt": salt, **extra}


def _settled(srv, conv, salt, want: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server settles on its own schedule after the client left
        n = _turns(srv, conv, salt)
        if n == want:
            return n
        time.sleep(0.1)
    return _turns(srv, conv, salt)


@pytest.mark.parametrize("leave", ["after_first_chunk", "after_headers"])
def test_a_client_that_leaves_early_commits_nothing(srv, leave):
    conv, salt = f"leave-{leave}", "deliver"
    first = chat_turn(srv.client(KEY), [{"role": "user", "content": "My name is Zora."}], conv, salt)
    for _ in range(20):
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            # a long answer: the client is gone well before its last byte could be sent
            body = _body(conv, salt, "What is my name?", max_tokens=200, ignore_eos=True)
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                if leave == "after_first_chunk":
                    lines = r.iter_lines()
                    assert next(line for line in lines if line.startswith("data: "))
        assert _settled(srv, conv, salt, 1) == 1  # as if the turn never happened
    # the next turn is the one it would have been without the abandoned ones (a control conversation never had
    # any); it may attach a checkpoint of an abandoned prompt (exact prompt tokens, never an answer)
    nxt = chat_turn(srv.client(KEY), [{"role": "user", "content": "What is my name?"}], conv, salt)
    control = [chat_turn(srv.client(KEY), [{"role": "user", "content": text}], f"control-{leave}", "control")
               for text in ("My name is Zora.", "What is my name?")][-1]
    assert (nxt.text, nxt.prompt_tokens) == (control.text, control.prompt_tokens)
    assert nxt.cached_tokens >= first.committed


def test_a_stream_read_to_done_and_a_whole_body_are_committed(srv):
    conv, salt = "delivered", "deliver"
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=_body(conv, salt, "My name is Zora.")) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[1][6:])["object"] == "chat.completion.chunk"
        assert _settled(srv, conv, salt, 1) == 1
        body = http.post("/v1/chat/completions", json=_body(conv, salt, "What is my name?", stream=False))
        assert body.status_code == 200
    assert _settled(srv, conv, salt, 2) == 2
    # a client that sends its next turn right after reading the answer is never refused: the server waits for
    # the previous turn to settle
    for text in ("I live in Oslo.", "Where do I live?"):
        t = chat_turn(srv.client(KEY), [{"role": "user", "content": text}], conv, salt)
        assert t.cached_tokens > 0
    assert _turns(srv, conv, salt) == 4


# --------------------------------------------------------------------------------------------------
# Continuous usage stats, x-request-id
# --------------------------------------------------------------------------------------------------

_USAGE = {"include_usage": True, "continuous_usage_stats": True}


def _counts(u) -> tuple[int, int, int]:
    return u.prompt_tokens, u.completion_tokens, u.total_tokens


def _running(chunks, tokens_of) -> list[int]:
    """Each chunk's completion_tokens, checked to grow by the chunk's own tokens; the prompt constant."""
    counts, prompt = [0], chunks[0].usage.prompt_tokens
    for c in chunks:
        u = c.usage
        assert u.prompt_tokens == prompt and u.total_tokens == prompt + u.completion_tokens
        assert u.completion_tokens == counts[-1] + tokens_of(c.choices[0])
        counts.append(u.completion_tokens)
    return counts[1:]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_continuous_usage_stats_in_every_chunk(srv, api):
    client = srv.client(KEY)
    kw = dict(model=NAME, max_tokens=8, temperature=0, logprobs=True if api == "chat" else 1,
              extra_body={"ignore_eos": True})
    if api == "chat":
        create, kw["messages"] = client.chat.completions.create, [{"role": "user", "content": "Count with me."}]
        tokens_of = lambda ch: len(ch.logprobs.content) if ch.logprobs else 0  # noqa: E731
    else:
        create, kw["prompt"] = client.completions.create, "Count with me:"
        tokens_of = lambda ch: len(ch.logprobs.tokens) if ch.logprobs else 0  # noqa: E731
    whole = create(**kw).usage
    chunks = list(create(**kw, stream=True, stream_options=_USAGE))
    assert chunks[-1].choices == [] and _counts(chunks[-1].usage) == _counts(whole)
    counts = _running(chunks[:-1], tokens_of)
    assert counts[-1] == whole.completion_tokens == 8 and counts == sorted(counts)
    assert chunks[-2].choices[0].finish_reason == "length"
    # without include_usage it is ignored (as vLLM): no usage anywhere
    chunks = list(create(**kw, stream=True, stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in chunks)


def test_x_request_id_echoed_or_generated(srv):
    msgs = [{"role": "user", "content": "Hi."}]
    ok = {"model": NAME, "messages": msgs, "max_tokens": 4, "temperature": 0}
    bad = dict(ok, temperature="hot")
    generated = re.compile(r"[0-9a-f]{32}")
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        for body, status in ((ok, 200), (bad, 400)):
            r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": f"mine-{status}"})
            assert (r.status_code, r.headers["x-request-id"]) == (status, f"mine-{status}")
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == status and generated.fullmatch(r.headers["x-request-id"])
        with http.stream("POST", "/v1/chat/completions", json=dict(ok, stream=True),
                         headers={"X-Request-Id": "mine-stream"}) as r:
            assert r.headers["x-request-id"] == "mine-stream" and list(r.iter_lines())
        too_long = "x" * 129
        for method, path, status in (("GET", "/no-such-route", 404), ("GET", "/version", 200)):
            r = http.request(method, path, headers={"X-Request-Id": too_long})
            assert r.status_code == status and generated.fullmatch(r.headers["x-request-id"])
    assert isinstance(r.json()["version"], str)  # GET /version as vLLM answers it
    r = httpx.get(srv.url + "/v1/models", headers={"X-Request-Id": "no-key"})  # the guard's 401
    assert (r.status_code, r.headers["x-request-id"]) == (401, "no-key")
    # the openai client reads it as the response's request id
    assert generated.fullmatch(srv.client(KEY).chat.completions.create(**ok)._request_id)
