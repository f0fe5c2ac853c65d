"""One request can never hurt another (issue 19): hostile requests replayed against a real server while three
streams of another tenant run.

Every hostile case must get its documented 4xx in under 2 s; the victim streams (temperature 0) must finish
byte-identical to an undisturbed run of the same prompts; /health stays truthful; the server's RSS after the run is
within 10% of before. A second server with a 4-slot pool takes 100 mixed requests with n up to its documented
maximum: no 5xx, no failed request.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from test_grammar_limits import anyof_compact, assert_clean, lark_alternation, megabyte_schema, regex_blowup
from test_server import (COMMON, NAME, ServerProcess, assert_openai_error, server_env,  # noqa: F401 (fixtures)
                         workdir)

SLOTS = 17          # 16 usable state slots: the default pool of a 4-sequence server, as the attack found it
MAX_N = 15          # n choices + their shared prompt state must fit: 16 slots
SMALL_SLOTS, SMALL_MAX_N = 4, 2
FAST_S = 2.0        # every hostile request is answered within this
HEAD_TIMEOUT = 1.5  # --request-header-timeout and --timeout-keep-alive of the server under attack
MAX_CONNECTIONS = 24
VICTIM_PROMPTS = ["Tell me a story about a lighthouse.", "What do cats like to eat?", "Count from one to ten."]
VICTIM_TOKENS = 40
_CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def srv(workdir, server_env):
    args = [*COMMON, "--num-slots", str(SLOTS), "--max-request-bytes", str(4 << 20), "--request-header-timeout",
            str(HEAD_TIMEOUT), "--timeout-keep-alive", str(HEAD_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)]
    s = ServerProcess("hostile", workdir, args, server_env).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(workdir, server_env):
    s = ServerProcess("hostile-small", workdir, [*COMMON, "--max-num-seqs", "2", "--num-slots", str(SMALL_SLOTS)],
                      server_env).start()
    yield s
    s.stop()


def _rss_kib(srv: ServerProcess) -> int:
    with open(f"/proc/{srv.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _stream_text(http: httpx.Client, body: dict) -> str:
    """The concatenated content of a streamed chat completion (its finish must be a normal one)."""
    out, finish = [], None
    with http.stream("POST", _CHAT, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                out.append(c["delta"].get("content") or "")
                finish = c.get("finish_reason") or finish
    assert finish in ("stop", "length"), finish
    return "".join(out)


def _victim_body(prompt: str) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": VICTIM_TOKENS,
            "temperature": 0, "cache_salt": "victim"}


class Victims:
    """Three streams of another tenant, each repeated until stopped; every run must equal the undisturbed one."""

    def __init__(self, srv: ServerProcess):
        self.srv, self.stop, self.errors, self.runs = srv, threading.Event(), [], 0
        with srv.http() as http:
            self.reference = [_stream_text(http, _victim_body(p)) for p in VICTIM_PROMPTS]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(3)]

    def _run(self, i: int):
        with self.srv.http() as http:
            while not self.stop.is_set():
                try:
                    got = _stream_text(http, _victim_body(VICTIM_PROMPTS[i]))
                    if got != self.reference[i]:
                        self.errors.append(f"stream {i} differs: {got!r} != {self.reference[i]!r}")
                    self.runs += 1
                except Exception as e:  # noqa: BLE001 (reported by the test)
                    self.errors.append(f"stream {i}: {type(e).__name__}: {e}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def _timed(fn):
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


# --------------------------------------------------------------------------------------------------
# The hostile cases: each returns after asserting its answer
# --------------------------------------------------------------------------------------------------

def case_n_beyond_the_pool(srv):
    with srv.http() as http:
        r, dt = _timed(lambda: http.post(_CHAT, json={"model": NAME, "n": MAX_N + 1, "max_tokens": 8,
                                                      "messages": [{"role": "user", "content": "hi"}]}))
    assert_openai_error(r, 400)
    assert r.json()["error"]["param"] == "n" and f"at most {MAX_N}" in r.json()["error"]["message"]
    assert dt < FAST_S


def case_n_at_the_pool(srv):
    """The largest n the pool holds is served while the victims run (it waits its turn, never fails)."""
    with srv.http() as http:
        r = http.post(_CHAT, json={"model": NAME, "n": MAX_N, "max_tokens": 8, "temperature": 1.0, "seed": 3,
                                   "messages": [{"role": "user", "content": "Pick a word."}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == MAX_N


def case_unread_answer_not_committed(srv):
    """A client that reads nothing of a long streamed answer: the turn is not committed while its bytes sit
    unacknowledged (a read of the conversation waits for the settle), and is once the client reads them."""
    conv, salt = f"unread-{random.randrange(1 << 30)}", "hostile"
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Talk."}], "stream": True,
                       "max_tokens": 900, "ignore_eos": True, "temperature": 0, "conversation_id": conv,
                       "cache_salt": salt, "logprobs": True, "top_logprobs": 5}).encode()
    u = urlsplit(srv.url)
    sock = socket.create_connection((u.hostname, u.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        with srv.http() as http:  # while it is generated the conversation has no turn (404); once generated
            deadline = time.monotonic() + 120  # it is held, unread: a read waits for its settle (times out here)
            while True:
                assert time.monotonic() < deadline, "the unread answer was never held"
                try:
                    r = http.get(f"/v1/conversations/{conv}", headers={"X-Cache-Salt": salt}, timeout=1.5)
                except httpx.ReadTimeout:
                    break
                assert r.status_code == 404, r.text  # never committed while its bytes sit unread
                time.sleep(0.2)
        sock.settimeout(30)
        data = b""
        while not data.endswith(b"0\r\n\r\n"):  # the chunked body's end
            chunk = sock.recv(1 << 16)
            assert chunk, "connection closed before the end of the answer"
            data += chunk
        assert b"data: [DONE]" in data and len(data) > 200_000, len(data)
        with srv.http() as http:
            r, dt = _timed(lambda: http.get(f"/v1/conversations/{conv}", headers={"X-Cache-Salt": salt}))
        assert r.status_code == 200 and r.json()["turns"] == 1, r.text
        assert dt < FAST_S
    finally:
        sock.close()


def case_read_right_after_done(srv):
    """GET of a new conversation right after its [DONE] finds it (the read waits for the settle)."""
    with srv.http() as http:
        for i in range(10):
            conv = f"fresh-{random.randrange(1 << 30)}-{i}"
            _stream_text(http, {"model": NAME, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 6,
                                "temperature": 0, "conversation_id": conv, "cache_salt": "hostile"})
            r = http.get(f"/v1/conversations/{conv}", headers={"X-Cache-Salt": "hostile"})
            assert r.status_code == 200 and r.json()["turns"] == 1, r.text


def _constraint(**extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "Answer."}], "max_tokens": 8, **extra}


HOSTILE_CONSTRAINTS = [
    (_constraint(structured_outputs={"regex": regex_blowup(random.randrange(2, 1 << 20))}), "structured_outputs"),
    (_constraint(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": anyof_compact(5000)}}),
     "response_format"),
    (_constraint(structured_outputs={"grammar": lark_alternation(50_000)}), "structured_outputs"),
    (_constraint(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": megabyte_schema()}}),
     "response_format"),
]


def case_hostile_constraints(srv):
    with srv.http() as http:
        for body, param in HOSTILE_CONSTRAINTS:
            r, dt = _timed(lambda: http.post(_CHAT, json=body))
            assert_openai_error(r, 400)
            assert r.json()["error"]["param"] == param, r.text
            assert_clean(r.json()["error"]["message"])
            assert dt < FAST_S, (param, dt)


def case_repeated_salt_header(srv):
    with srv.http() as http:
        made = http.post(_CHAT, json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                      "conversation_id": "alice-conv"}, headers={"X-Cache-Salt": "alice"})
        assert made.status_code == 200, made.text
        for method, path in [("GET", "/v1/conversations/alice-conv"), ("GET", "/v1/conversations"),
                             ("DELETE", "/v1/conversations/alice-conv")]:
            r, dt = _timed(lambda: http.request(method, path, headers=[("X-Cache-Salt", "mallory"),
                                                                       ("X-Cache-Salt", "alice")]))
            assert_openai_error(r, 400, "duplicate_header")
            assert dt < FAST_S
        assert http.get("/v1/conversations/alice-conv", headers={"X-Cache-Salt": "alice"}).status_code == 200
        http.delete("/v1/conversations/alice-conv", headers={"X-Cache-Salt": "alice"})


def case_hostile_tokenize(srv):
    with srv.http() as http:
        r, dt = _timed(lambda: http.post("/tokenize", json={"messages": [{"role": "user", "content": "y" * 900}] * 4096}))
    assert_openai_error(r, 400, "context_length_exceeded")
    assert dt < FAST_S


def _closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> bytes:
    """What the server sends before it closes `sock`, dripping `drip` a byte per 0.1 s; fails if still open
    after `seconds`."""
    sock.settimeout(0.1)
    data, deadline = b"", time.monotonic() + seconds
    for i in range(1 << 30):
        assert time.monotonic() < deadline, f"still open after {seconds} s"
        try:
            if i < len(drip):
                sock.send(drip[i:i + 1])
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk


def case_dripped_and_idle_connections(srv):
    u = urlsplit(srv.url)
    with socket.create_connection((u.hostname, u.port)) as dripped, \
            socket.create_connection((u.hostname, u.port)) as silent:
        got = _closed_within(dripped, HEAD_TIMEOUT + FAST_S, drip=b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100)
        assert got.startswith(b"HTTP/1.1 408"), got
        assert _closed_within(silent, FAST_S) == b""  # it waited as long as the dripped one: past its timeout


def case_connections_beyond_the_cap(srv):
    u = urlsplit(srv.url)
    socks = [socket.create_connection((u.hostname, u.port)) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        statuses = []
        for s in socks:
            s.settimeout(FAST_S)
            statuses.append(s.recv(65536).split(b" ", 2)[1])
        assert statuses.count(b"503") >= 4 and set(statuses) == {b"200", b"503"}, statuses  # victims hold 3
    finally:
        for s in socks:
            s.close()


CASES = [case_n_beyond_the_pool, case_n_at_the_pool, case_unread_answer_not_committed, case_read_right_after_done,
         case_hostile_constraints, case_repeated_salt_header, case_hostile_tokenize, case_dripped_and_idle_connections,
         case_connections_beyond_the_cap]


def test_hostile_requests_leave_other_tenants_alone(srv):
    with srv.http() as http:  # warm what a first use builds (the grammar engine), then measure
        assert http.post(_CHAT, json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                      "response_format": {"type": "json_object"}}).status_code == 200
    victims = Victims(srv)
    for case in CASES:  # once undisturbed: what a first use allocates is not counted as growth
        case(srv)
    rss_before = _rss_kib(srv)
    with victims:
        for case in CASES:
            case(srv)
            with srv.http() as http:
                assert http.get("/health").json() == {"status": "ok"}
    assert not victims.errors, victims.errors[:5]
    assert victims.runs >= 3
    deadline = time.monotonic() + 30  # constraints that outlived their request finish compiling in the background
    while _rss_kib(srv) > rss_before * 1.10 and time.monotonic() < deadline:
        time.sleep(0.5)
    rss_after = _rss_kib(srv)
    print(f"\n[hostile] {victims.runs} victim streams, RSS {rss_before >> 10} -> {rss_after >> 10} MiB")
    assert rss_after <= rss_before * 1.10, (rss_before, rss_after)


# --------------------------------------------------------------------------------------------------
# Pool pressure
# --------------------------------------------------------------------------------------------------

def _mixed_request(srv: ServerProcess, i: int, max_n: int) -> tuple[str, int, str]:
    rng = random.Random(i)
    kind = rng.choice(["n", "tenant", "stream"])
    body = {"model": NAME, "messages": [{"role": "user", "content": f"Message {i}: tell me about {rng.random()}"}],
            "max_tokens": rng.randint(2, 10), "temperature": 0.8, "seed": i}
    if kind == "n":
        body["n"] = rng.randint(2, max_n)
    else:
        body.update(conversation_id=f"t{i % 7}", cache_salt=f"tenant-{i % 3}")
    with srv.http() as http:
        for _ in range(50):
            if kind == "stream":
                with http.stream("POST", _CHAT, json={**body, "stream": True}) as r:
                    text = r.read().decode()
                    status = r.status_code
                    ok = status == 200 and '"error"' not in text and "[DONE]" in text
            else:
                r = http.post(_CHAT, json=body)
                status, text = r.status_code, r.text
                ok = status == 200 and len(r.json()["choices"]) == body.get("n", 1)
            if status != 409:  # 409: the same conversation's previous turn is still in flight: try again
                return kind, 200 if ok else (status if status != 200 else -1), text[:300]
            time.sleep(0.05)
    return kind, 409, "conversation busy for too long"


@pytest.mark.parametrize("which", ["small", "srv"])
def test_pool_pressure_mixed_requests(which, request):
    srv = request.getfixturevalue(which)
    max_n = SMALL_MAX_N if which == "small" else MAX_N
    with srv.http() as http:  # the documented maximum, and one past it
        r = http.post(_CHAT, json={"model": NAME, "n": max_n + 1, "max_tokens": 2,
                                   "messages": [{"role": "user", "content": "hi"}]})
        assert_openai_error(r, 400)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: _mixed_request(srv, i, max_n), range(100)))
    bad = [(i, r) for i, r in enumerate(results) if r[1] != 200]
    assert not bad, bad[:5]
    with srv.http() as http:
        assert http.get("/health").status_code == 200


def test_foreign_cache_dir_is_refused_before_loading(server_env, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "my_tmp_notes.txt").write_text("keep me")
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "serving", "--port", "0", *COMMON, "--cache-dir", str(foreign)],
                       env=server_env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "not created by this server" in p.stderr and "my_tmp_notes.txt" in p.stderr
    assert time.monotonic() - t < 60
    assert os.listdir(foreign) == ["my_tmp_notes.txt"]
