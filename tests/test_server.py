"""End-to-end tests of the OpenAI-compatible server: `python -m serving` as a real subprocess on 127.0.0.1,
talked to with the real `openai` client and with raw httpx (wire format, disconnects, malformed requests).

Servers (module-scoped, started once): `exact` (cache mode exact, with --api-key) and `baseline` (cache mode
none: recomputes every turn, the reference for exactness), plus two short-lived ones for the restart test.
All share one JAX persistent compilation cache, so only the first server pays for most jit compiles.

Env: SERVING_TEST_MODEL=PATH runs against another checkpoint than the embedded default model.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("SERVING_TEST_MODEL")
NAME = "tiny-hybrid"
KEY = "sk-test-0123456789"
MAX_MODEL_LEN = 1024
MAX_REQUEST_BYTES = 1 << 20
MAX_TOKENS = 12
COMMON = ["--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4",
          "--block-size", "16", "--max-request-bytes", str(MAX_REQUEST_BYTES), "--log-level", "warning"]
USER_TURNS = ["Hello there! Who are you?", "Tell me something about caches.", "And what about Mamba state?",
              "Thanks, that is all for today."]
START_TIMEOUT_S = 240


# --------------------------------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------------------------------

class ServerProcess:
    def __init__(self, name: str, workdir: Path, args: list[str], env: dict[str, str]):
        self.name, self.args, self.env = name, args, env
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    def start(self) -> "ServerProcess":
        self.starts += 1
        log = open(self.log_path, "a")
        log.write(f"\n===== start {self.starts}: {' '.join(self.args)}\n")
        log.flush()
        cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", "0", *self.args]
        if MODEL:
            cmd += ["--model", MODEL]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        pattern = re.compile(r"Serving (\S+) on (http://127\.0\.0\.1:\d+)")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            matches = pattern.findall(self.log_path.read_text(errors="replace").split("===== start")[-1])
            if matches:
                assert matches[-1][0] == NAME, matches
                self.url = matches[-1][1]
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.proc.kill()
        pytest.fail(f"server {self.name} not ready in {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"server {self.name} ignored signal {sig} for {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def step_programs(self) -> tuple[int, int]:
        """(compiled, total) step programs, as the server's /metrics says."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return tuple(int(float(re.search(rf"^hybrid_serve_step_programs_{k} (\S+)$", text, re.M).group(1)))
                     for k in ("compiled", "total"))

    def wait_until_compiled(self, timeout: float = 900) -> None:
        """Wait for the background warm-up to compile every step program (a steady state to measure from)."""
        deadline = time.monotonic() + timeout
        while (n := self.step_programs())[0] < n[1]:
            assert time.monotonic() < deadline, self.log_tail()
            time.sleep(0.5)

    def client(self, key: str | None = None) -> openai.OpenAI:
        # max_retries=0: the client must not hide 409/429/5xx by retrying.
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def server_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # One persistent jit cache for all servers of this run: only the first one compiles.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax-cache")))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("HYBRID_SERVE_API_KEY", None)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="module")
def exact(workdir, server_env):
    srv = ServerProcess("exact", workdir, [*COMMON, "--cache-mode", "exact", "--api-key", KEY], server_env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def baseline(workdir, server_env):
    srv = ServerProcess("baseline", workdir, [*COMMON, "--cache-mode", "none"], server_env).start()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

@dataclass
class Turn:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str

    @property
    def committed(self) -> int:
        """The committed length after this turn: prompt + generated, less the last sampled token (it has not
        been fed through the model yet)."""
        return self.prompt_tokens + self.completion_tokens - 1


def _extra(conv: str | None, salt: str | None, **extra) -> dict:
    body = dict(extra)
    if conv is not None:
        body["conversation_id"] = conv
    if salt is not None:
        body["cache_salt"] = salt
    return body


def chat_turn(client: openai.OpenAI, messages: list[dict], conv: str | None = None, salt: str | None = None, *,
              stream: bool = False, max_tokens: int = MAX_TOKENS, **extra) -> Turn:
    kw = dict(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=_extra(conv, salt,
                                                                                                    **extra))
    if not stream:
        r = client.chat.completions.create(**kw)
        assert r.object == "chat.completion" and r.model == NAME and r.id and isinstance(r.created, int)
        assert len(r.choices) == 1 and r.choices[0].index == 0
        msg = r.choices[0].message
        assert msg.role == "assistant" and isinstance(msg.content, str)
        u = r.usage
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens is not None
        return Turn(msg.content, u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens,
                    r.choices[0].finish_reason)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3, chunks
    assert all(c.object == "chat.completion.chunk" and c.model == NAME and isinstance(c.created, int)
               for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first, final, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.choices[0].finish_reason is None
    middle = chunks[1:-2]
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in middle)
    assert final.choices[0].finish_reason in ("stop", "length") and not final.choices[0].delta.content
    assert usage.choices == [] and usage.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in middle)
    u = usage.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    return Turn(text, u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens,
                final.choices[0].finish_reason)


def converse(client: openai.OpenAI, conv: str | None, salt: str | None, user_turns=USER_TURNS, *,
             stream: bool = False, full_history: bool = True, history: list[dict] | None = None, **kw):
    """Run turns; full_history resends the whole conversation (the OpenAI way), otherwise only the new user
    message goes out (the suffix protocol). Returns (turns, history)."""
    history = list(history or [])
    turns = []
    for text in user_turns:
        history.append({"role": "user", "content": text})
        t = chat_turn(client, history if full_history else history[-1:], conv, salt, stream=stream, **kw)
        history.append({"role": "assistant", "content": t.text})
        turns.append(t)
    return turns, history


def assert_same_outputs(got: list[Turn], ref: list[Turn]):
    assert [t.text for t in got] == [t.text for t in ref]
    assert [t.completion_tokens for t in got] == [t.completion_tokens for t in ref]
    assert [t.prompt_tokens for t in got] == [t.prompt_tokens for t in ref]
    assert [t.finish_reason for t in got] == [t.finish_reason for t in ref]


def assert_cache_hits(turns: list[Turn]):
    """Turn 1 is a miss; from turn 2 on, exactly the committed length of the previous turn is cached."""
    assert turns[0].cached_tokens == 0
    for i, (prev, cur) in enumerate(zip(turns, turns[1:]), start=2):
        assert cur.cached_tokens > 0, f"turn {i} missed the cache"
        assert cur.cached_tokens == prev.committed, (i, prev, cur)
        assert cur.prompt_tokens > cur.cached_tokens


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err


def wait_for_lease(fn, timeout: float = 30.0):
    """Call fn until it stops failing with 409 (an aborted turn releases its lease asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except openai.ConflictError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(baseline):
    """The 4-turn conversation on the recompute-everything server: the expected outputs."""
    turns, _ = converse(baseline.client(), "reference", "tenant-a")
    assert all(t.cached_tokens == 0 for t in turns)  # cache mode none never reuses state
    return turns


# --------------------------------------------------------------------------------------------------
# Exactness of the conversation cache through the server
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream,full_history", [(False, True), (True, True), (True, False), (False, False)],
                         ids=["nonstream-history", "stream-history", "stream-suffix", "nonstream-suffix"])
def test_four_turns_exact(exact, baseline, reference, stream, full_history):
    conv = f"four-{stream}-{full_history}"
    salt = f"tenant-{conv}"  # its own salt: the first turn is a miss (another salt never shares a prefix)
    got, _ = converse(exact.client(KEY), conv, salt, stream=stream, full_history=full_history)
    assert_same_outputs(got, reference)
    assert_cache_hits(got)
    # The same protocol on the recompute server gives the same outputs and never hits.
    base, _ = converse(baseline.client(), conv, salt, stream=stream, full_history=full_history)
    assert_same_outputs(base, reference)
    assert all(t.cached_tokens == 0 for t in base)
    with exact.http(KEY) as http:
        info = http.get(f"/v1/conversations/{conv}", params={"cache_salt": salt})
        assert info.status_code == 200, info.text
        info = info.json()
    last = got[-1]
    assert info["turns"] == 4
    # committed tokens: all the model consumed, plus the last sampled token unless it was a stop token
    assert info["cached_tokens"] == last.committed
    assert info["tokens"] == last.committed + (0 if last.finish_reason == "stop" else 1)
    assert isinstance(info["last_used"], (int, float)) and info["last_used"] > 0


def test_stream_wire_format(exact):
    """The raw SSE stream: `data: {json}` events, role first, content deltas, finish, usage, `data: [DONE]`."""
    body = {"model": NAME, "messages": [{"role": "user", "content": USER_TURNS[0]}], "max_tokens": 6,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with exact.http(KEY) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == NAME and isinstance(c["created"], int)
        assert "usage" in c
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens_details"] == {"cached_tokens": 0}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    # Without stream_options the chunks carry no usage and there is no usage chunk.
    body.pop("stream_options")
    with exact.http(KEY) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = r.read().decode()
    chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == text


# --------------------------------------------------------------------------------------------------
# Isolation (I5), the lease (I6), failed turns (I3)
# --------------------------------------------------------------------------------------------------

def test_isolation_between_salts(exact):
    client = exact.client(KEY)
    conv = "isolated"
    turns, history = converse(client, conv, "iso-a", USER_TURNS[:2])
    assert_cache_hits(turns)
    with exact.http(KEY) as http:
        url = f"/v1/conversations/{conv}"
        ok = http.get(url, params={"cache_salt": "iso-a"})
        assert ok.status_code == 200 and ok.json()["turns"] == 2
        ok = http.get(url, headers={"X-Cache-Salt": "iso-a"})
        assert ok.status_code == 200 and ok.json()["turns"] == 2
        wrong = http.get(url, params={"cache_salt": "tenant-b"})
        assert_openai_error(wrong, 404)
        # A wrong salt is indistinguishable from an id that was never used.
        assert http.get("/v1/conversations/never-used", params={"cache_salt": "tenant-b"}).status_code == 404
        assert wrong.json() == http.get(url, params={"cache_salt": "tenant-zzz"}).json()
        assert_openai_error(http.get(url, headers={"X-Cache-Salt": "tenant-b"}), 404)
        assert_openai_error(http.get(url), 404)  # no salt is another tenant too
        assert_openai_error(http.delete(url, params={"cache_salt": "tenant-b"}), 404)
        assert_openai_error(http.delete(url), 404)
        assert http.get(url, params={"cache_salt": "iso-a"}).json()["turns"] == 2  # still there

    nxt = history + [{"role": "user", "content": USER_TURNS[2]}]
    assert chat_turn(client, nxt, conv, "tenant-b").cached_tokens == 0
    # No salt is a namespace of its own: whatever others left there, never this tenant's state.
    assert chat_turn(client, nxt, conv, None).cached_tokens < turns[-1].committed
    recomputed = chat_turn(client, nxt, None, "iso-fresh")  # no conversation, a salt with nothing committed
    assert recomputed.cached_tokens == 0
    # Under one salt any request whose prompt begins with a checkpoint's tokens attaches it: the no-salt turn
    # above committed this very history, so the same history without a conversation id hits all but one token.
    anon = chat_turn(client, nxt)
    assert anon.cached_tokens == anon.prompt_tokens - 1 and anon.text == recomputed.text
    # The owner still hits, with exactly its committed state.
    third = chat_turn(client, nxt, conv, "iso-a")
    assert third.cached_tokens == turns[-1].committed
    # The salt may also come as the X-Cache-Salt header.
    nxt += [{"role": "assistant", "content": third.text}, {"role": "user", "content": USER_TURNS[3]}]
    r = client.chat.completions.create(model=NAME, messages=nxt, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body={"conversation_id": conv}, extra_headers={"X-Cache-Salt": "iso-a"})
    assert r.usage.prompt_tokens_details.cached_tokens == third.committed

    with exact.http(KEY) as http:
        deleted = http.delete(url, params={"cache_salt": "iso-a"})
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert_openai_error(http.get(url, params={"cache_salt": "iso-a"}), 404)
        assert_openai_error(http.delete(url, params={"cache_salt": "iso-a"}), 404)
    # After delete the conversation starts over: a miss, computed like any request without a conversation.
    nxt = nxt[:5]
    again = chat_turn(client, nxt, conv, "iso-a")
    assert again.cached_tokens == 0
    assert (again.text, again.prompt_tokens) == (recomputed.text, recomputed.prompt_tokens)


def _open_stream(srv: ServerProcess, messages, conv, salt, max_tokens, key=None):
    """Start a streamed turn with raw httpx; returns (client, response cm, text so far, line iterator)
    positioned after the first content delta."""
    http = srv.http(key)
    body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "conversation_id": conv, "cache_salt": salt,
            "stream_options": {"include_usage": True}}
    cm = http.stream("POST", "/v1/chat/completions", json=body)
    resp = cm.__enter__()
    assert resp.status_code == 200, resp.read()
    lines = resp.iter_lines()
    seen = ""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                seen += chunk["choices"][0]["delta"]["content"]
                return http, cm, seen, lines
    raise AssertionError("stream ended before any content")


def test_concurrent_turn_gets_409(exact, baseline):
    conv, salt = "busy", "tenant-a"
    client, ref_client = exact.client(KEY), baseline.client()
    first, history = converse(client, conv, salt, USER_TURNS[:1])
    ref_first, ref_history = converse(ref_client, conv, salt, USER_TURNS[:1])
    assert_same_outputs(first, ref_first)

    msgs = history + [{"role": "user", "content": USER_TURNS[1]}]
    http, cm, seen, lines = _open_stream(exact, msgs, conv, salt, max_tokens=200, key=KEY)
    try:
        # While that turn streams, a second turn on the same conversation is refused...
        with pytest.raises(openai.ConflictError) as ei:
            chat_turn(client, msgs, conv, salt)
        assert ei.value.status_code == 409
        assert ei.value.response.json()["error"]["type"]
        # ... and so is deleting it; another conversation (or salt) is not affected.
        assert_openai_error(http.delete(f"/v1/conversations/{conv}", params={"cache_salt": salt},
                                        headers={"Authorization": f"Bearer {KEY}"}), 409)
        assert chat_turn(client, msgs, conv, "tenant-other").cached_tokens == 0
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    finally:
        cm.__exit__(None, None, None)
        http.close()
    assert rest[-1]["choices"] == [] and rest[-2]["choices"][0]["finish_reason"] == "length"
    usage = rest[-1]["usage"]
    assert usage["completion_tokens"] == 200 and usage["prompt_tokens_details"]["cached_tokens"] == first[0].committed
    streamed = seen + "".join(c["choices"][0]["delta"].get("content", "") for c in rest[:-2])

    # The conversation stays exact: the winner's turn was committed, the refused one left no trace.
    ref_second = chat_turn(ref_client, msgs, conv, salt, max_tokens=200, ignore_eos=True)
    assert ref_second.completion_tokens == 200 and ref_second.text == streamed
    ref_history = msgs + [{"role": "assistant", "content": ref_second.text}]
    nxt = ref_history + [{"role": "user", "content": USER_TURNS[2]}]
    third, ref_third = chat_turn(client, nxt, conv, salt), chat_turn(ref_client, nxt, conv, salt)
    assert_same_outputs([third], [ref_third])
    with exact.http(KEY) as h:
        assert h.get(f"/v1/conversations/{conv}", params={"cache_salt": salt}).json()["turns"] == 3
    # (Whether turn 3 hits after an ignore_eos turn is test_hit_after_ignore_eos_turn's business.)


def _is_byte_level(srv: ServerProcess) -> bool:
    with srv.http(KEY) as http:
        return http.post("/tokenize", json={"prompt": "aé"}).json()["tokens"] == [97, 195, 169]


def _hit_after(exact, baseline, conv, first_kw):
    """Turn 1 with first_kw, then a normal turn 2: identical to the recompute server, and turn 2 reuses exactly
    the committed state (prompt + generated - 1), whatever tokens turn 1 ended with."""
    client, ref_client = exact.client(KEY), baseline.client()
    msgs = [{"role": "user", "content": USER_TURNS[0]}]
    first, ref_first = chat_turn(client, msgs, conv, "t", **first_kw), chat_turn(ref_client, msgs, conv, "t",
                                                                                 **first_kw)
    assert_same_outputs([first], [ref_first])
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": USER_TURNS[1]}]
    second, ref_second = chat_turn(client, msgs, conv, "t"), chat_turn(ref_client, msgs, conv, "t")
    assert_same_outputs([second], [ref_second])
    assert second.cached_tokens == first.committed, (first, second)


def test_hit_after_stop_token_turn(exact, baseline):
    """A turn that ends on a stop token the chat template does not write (here: any byte, via stop_token_ids;
    the same happens when a model ends with <eos> instead of the template's end-of-turn token) is committed
    without that token's text; the next turn must still reuse the committed state."""
    if not _is_byte_level(exact):
        pytest.skip("needs the byte-level tokenizer of the default model")
    _hit_after(exact, baseline, "stop-token", dict(stop_token_ids=list(range(256)), max_tokens=8))


def test_hit_after_ignore_eos_turn(exact, baseline):
    """With ignore_eos the committed ids can hold special tokens that the returned text omits; the next turn
    must still reuse the committed state."""
    _hit_after(exact, baseline, "ignore-eos", dict(ignore_eos=True, max_tokens=200))


def test_disconnect_discards_turn(exact, baseline):
    conv, salt = "dropped", "tenant-a"
    client, ref_client = exact.client(KEY), baseline.client()
    turns, history = converse(client, conv, salt, USER_TURNS[:2])
    ref_turns, _ = converse(ref_client, conv, salt, USER_TURNS[:2])
    assert_same_outputs(turns, ref_turns)

    # A long turn, abandoned after its first content chunk: the server aborts it and the turn is discarded.
    broken = history + [{"role": "user", "content": "This turn will be abandoned mid-stream."}]
    http, cm, _, _ = _open_stream(exact, broken, conv, salt, max_tokens=700, key=KEY)
    cm.__exit__(None, None, None)
    http.close()

    nxt = history + [{"role": "user", "content": USER_TURNS[2]}]
    third = wait_for_lease(lambda: chat_turn(client, nxt, conv, salt))
    ref_third = chat_turn(ref_client, nxt, conv, salt)
    assert_same_outputs([third], [ref_third])
    assert third.cached_tokens == turns[-1].committed
    with exact.http(KEY) as h:
        assert h.get(f"/v1/conversations/{conv}", params={"cache_salt": salt}).json()["turns"] == 3


def _metric(srv: ServerProcess, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_nonstream_disconnect_aborts(exact):
    """A dropped non-streaming request (client timeout) is aborted too, and the server keeps answering."""
    before = _metric(exact, "hybrid_serve_generation_tokens_total")
    client = openai.OpenAI(base_url=exact.url + "/v1", api_key=KEY, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=MAX_MODEL_LEN - 20, temperature=0, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 30
    while _metric(exact, "hybrid_serve_num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(exact, "hybrid_serve_num_requests_running") == 0
    assert _metric(exact, "hybrid_serve_generation_tokens_total") - before < MAX_MODEL_LEN - 20  # cut short
    t = chat_turn(exact.client(KEY), [{"role": "user", "content": "still there?"}], max_tokens=4, ignore_eos=True)
    assert t.completion_tokens == 4


# --------------------------------------------------------------------------------------------------
# Malformed requests: the right status and the OpenAI error body, and the server keeps serving
# --------------------------------------------------------------------------------------------------

def _chat(**over):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    body.update(over)
    return {"json": {k: v for k, v in body.items() if v is not _DROP}}


_DROP = object()
_CHAT, _CMPL = "/v1/chat/completions", "/v1/completions"

# The table of malformed requests (and the other edge checks) is in tests/test_edge.py.


def test_api_key(exact):
    with httpx.Client(base_url=exact.url, timeout=30) as http:
        assert_openai_error(http.get("/v1/models"), 401, "invalid_api_key")
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(http.post(_CHAT, **_chat()), 401)
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert http.get("/health").status_code == 200  # not under /v1
    with pytest.raises(openai.AuthenticationError):
        exact.client("wrong-key").models.list()
    t = chat_turn(exact.client(KEY), [{"role": "user", "content": "hi"}], max_tokens=2, ignore_eos=True)
    assert t.completion_tokens == 2


# --------------------------------------------------------------------------------------------------
# Durability: --cache-dir across a graceful restart
# --------------------------------------------------------------------------------------------------

def test_restart_with_cache_dir(exact, workdir, server_env, tmp_path):
    cache_dir = tmp_path / "state"
    conv, salt = "durable", "tenant-d"
    srv = ServerProcess("durable", workdir, [*COMMON, "--cache-mode", "exact", "--cache-dir", str(cache_dir)],
                        server_env)
    srv.start()
    try:
        turns, history = converse(srv.client(), conv, salt, USER_TURNS[:2])
        assert_cache_hits(turns)
        assert srv.stop(signal.SIGTERM) == 0, srv.log_tail()
        assert cache_dir.is_dir() and any(cache_dir.iterdir()), "nothing saved on SIGTERM"
        srv.start()
        with srv.http() as http:
            info = http.get(f"/v1/conversations/{conv}", params={"cache_salt": salt})
            assert info.status_code == 200, info.text
            assert info.json()["turns"] == 2 and info.json()["cached_tokens"] == turns[-1].committed
            assert_openai_error(http.get(f"/v1/conversations/{conv}", params={"cache_salt": "other"}), 404)
        third, _ = converse(srv.client(), conv, salt, USER_TURNS[2:3], history=history)
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.log_tail()
    # Turn 3 after the restart hits the restored state and matches an uninterrupted run.
    assert third[0].cached_tokens == turns[-1].committed
    uninterrupted, _ = converse(exact.client(KEY), "durable-reference", salt, USER_TURNS[:3])
    assert_same_outputs(turns + third, uninterrupted)


# --------------------------------------------------------------------------------------------------
# Completions, logprobs, metrics, tokenizer, models
# --------------------------------------------------------------------------------------------------

def test_completions(exact):
    client = exact.client(KEY)
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    with exact.http(KEY) as http:
        ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_completions_conversation(exact, baseline):
    """Raw completions with a conversation_id continue the committed tokens (no chat template): from turn 2 on
    exactly the committed length is cached, and the outputs equal the recompute server's."""
    pieces = ["The cache keeps", " the exact state", " of every conversation", " turn by turn."]

    def run(srv, key):
        client, out = srv.client(key), []
        for i, piece in enumerate(pieces):
            stream = i % 2 == 1
            kw = dict(model=NAME, prompt=piece, max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"conversation_id": "raw", "cache_salt": "tenant-r"})
            if stream:
                chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
                u = chunks[-1].usage
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            else:
                r = client.completions.create(**kw)
                u, text, finish = r.usage, r.choices[0].text, r.choices[0].finish_reason
            out.append(Turn(text, u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens,
                            finish))
        return out

    got, ref = run(exact, KEY), run(baseline, None)
    assert_same_outputs(got, ref)
    assert_cache_hits(got)
    assert all(t.cached_tokens == 0 for t in ref)
    for prev, cur in zip(got, got[1:]):  # each prompt continues everything before it
        assert cur.prompt_tokens > prev.prompt_tokens + prev.completion_tokens - 1


def test_logprobs(exact):
    r = exact.client(KEY).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for tl in content:
        assert tl.logprob <= 0 and len(tl.top_logprobs) == 2
        # Greedy: the sampled token is the most likely one.
        assert tl.logprob == pytest.approx(max(t.logprob for t in tl.top_logprobs), abs=1e-5)


def test_metrics(exact):
    converse(exact.client(KEY), "metrics", "tenant-m", USER_TURNS[:2])
    with exact.http() as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ["hybrid_serve_time_to_first_token_seconds_bucket", "hybrid_serve_inter_token_latency_seconds_bucket",
                 "hybrid_serve_e2e_request_latency_seconds_bucket", "hybrid_serve_num_requests_running",
                 "hybrid_serve_num_requests_waiting", "hybrid_serve_kv_blocks_used", "hybrid_serve_kv_blocks_total",
                 "hybrid_serve_kv_cache_usage_ratio", "hybrid_serve_mamba_slots_used",
                 "hybrid_serve_mamba_slots_total", "hybrid_serve_mamba_slot_usage_ratio",
                 "hybrid_serve_prompt_tokens_total", "hybrid_serve_cached_prompt_tokens_total",
                 "hybrid_serve_generation_tokens_total", "hybrid_serve_cache_hits_total",
                 "hybrid_serve_cache_misses_total", "hybrid_serve_cache_misses_no_checkpoint_total",
                 "hybrid_serve_cache_misses_evicted_total", "hybrid_serve_cache_misses_not_prefix_total",
                 "hybrid_serve_checkpoint_evictions_total", "hybrid_serve_preemptions_total",
                 "hybrid_serve_cache_bytes"]:
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", text, re.M), name

    def value(name):
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    assert value("hybrid_serve_cache_hits_total") >= 1
    assert value("hybrid_serve_cached_prompt_tokens_total") > 0
    assert value("hybrid_serve_generation_tokens_total") >= 2
    assert value("hybrid_serve_time_to_first_token_seconds_count") >= 2
    assert 0 < value("hybrid_serve_kv_cache_usage_ratio") <= 1


def test_tokenize_detokenize(exact):
    with exact.http(KEY) as http:
        text = "Hello, wörld! ∑ 🙂"
        tok = http.post("/tokenize", json={"prompt": text}).json()
        assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_MODEL_LEN
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": text}
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
        chat = http.post("/tokenize", json={"messages": msgs}).json()
        assert chat["count"] == len(chat["tokens"]) > 0
        back = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
        assert "Be brief." in back and "Hello" in back
    # The chat prompt the server tokenizes is the one a turn is charged for.
    t = chat_turn(exact.client(KEY), msgs, max_tokens=2)
    assert t.prompt_tokens == chat["count"]


def test_models_health_version(exact):
    models = exact.client(KEY).models.list()
    assert [m.id for m in models.data] == [NAME]
    with exact.http() as http:
        assert http.get("/health").status_code == 200
        v = http.get("/version")
        assert v.status_code == 200 and v.json()["version"]
