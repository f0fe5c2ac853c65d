"""Two-phase commit at the edge: a turn is committed only when the server has handed the last byte of its answer
to the transport. A client that leaves earlier (after the first chunk, after the headers) leaves no turn
behind; a stream read to [DONE] and a whole body are committed."""
from __future__ import annotations

import json
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
