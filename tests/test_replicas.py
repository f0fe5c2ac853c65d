"""Replicas behind a real load balancer (issue 20): three servers sharing one PostgreSQL (started by the test from
the Debian package), behind nginx running the configuration of docs/deploy.md; 30 conversations of 6 turns send
only their new message, routed by the X-Conversation-Id header; one replica is SIGKILLed mid-run and never comes
back. Every conversation finishes, each answer equals a cache-less computation of its whole history, and before
the kill at least 95% of the turns after the first report cached_tokens equal to the committed length.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from test_durable import stream_turn
from test_server import COMMON, NAME, ServerProcess, server_env, workdir  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
CONVERSATIONS, TURNS, REPLICAS = 30, 6, 3
KILL_AFTER = 90  # completed turns before replica 0 is killed
_CHAT = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_config(ports: list[int], listen: int) -> str:
    """docs/deploy.md's nginx block with these replicas' ports and this listening port."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"```nginx\n(.*?)```", text, re.S).group(1)
    servers = re.findall(r"^\s*server 127\.0\.0\.1:\d+ .*;$", block, re.M)
    assert len(servers) == REPLICAS, servers
    for line, port in zip(servers, ports):
        block = block.replace(line, re.sub(r":\d+ ", f":{port} ", line), 1)
    return re.sub(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen};", block)


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(path):
        pytest.fail("nginx is not installed: `apt-get install -y nginx` (.ci/run does)", pytrace=False)
    return path


class Nginx:
    def __init__(self, binary: str, conf: str, prefix: Path):
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(f"{user}worker_processes 1;\nevents {{ worker_connections 1024; }}\n"
                                           f"http {{\n{conf}\n}}\n")
        self.proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g",
                                      f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def _turn(http: httpx.Client, cid: str, messages: list[dict], salt: str, header: bool = True) -> dict:
    """One streamed turn through the balancer, routed by its X-Conversation-Id header (none: any replica)."""
    headers = {"X-Cache-Salt": salt, **({"X-Conversation-Id": cid} if header else {})}
    return stream_turn(http, {"model": NAME, "messages": messages, "max_tokens": 10, "temperature": 0,
                              "stream_options": {"include_usage": True}}, headers)


class Conversation:
    def __init__(self, i: int):
        self.cid, self.salt, self.history, self.hits = f"replicated-{i}", f"tenant-{i % 4}", [], []

    def committed(self, http: httpx.Client) -> dict | None:
        r = http.get(f"/v1/conversations/{self.cid}",
                     headers={"X-Cache-Salt": self.salt, "X-Conversation-Id": self.cid})
        return r.json() if r.status_code == 200 else None

    def run(self, http: httpx.Client, done_turns: list, killed: threading.Event):
        committed = None  # the committed length after the last turn (prompt + answer, less its last token)
        while len(self.history) < 2 * TURNS:
            msg = {"role": "user", "content": f"{self.cid}, turn {len(self.history) // 2}: what comes next?"}
            got = _turn(http, self.cid, [msg], self.salt)
            if not got["done"]:
                if got["status"] not in (None, 200, 409, 502, 503):
                    raise AssertionError(f"{self.cid}: {got}")
                time.sleep(0.5)
                now = self.committed(http)  # a broken stream: committed only if its turn count moved
                if now is not None and now["turns"] == len(self.history) // 2 + 1 and got["finished"]:
                    self.history += [msg, {"role": "assistant", "content": got["text"]}]
                    committed = None
                continue
            usage = got["usage"]
            if committed is not None:
                self.hits.append((killed.is_set(), usage["prompt_tokens_details"]["cached_tokens"], committed))
            committed = usage["prompt_tokens"] + usage["completion_tokens"] - 1
            self.history += [msg, {"role": "assistant", "content": got["text"]}]
            done_turns.append(1)


def test_replicas_behind_nginx_survive_a_killed_replica(pg_server, nginx_bin, workdir, server_env, tmp_path):
    url = pg_server.new_database("replicas")
    replicas = [ServerProcess(f"replica-{i}", workdir, [*COMMON, "--state-db", url], server_env)
                for i in range(REPLICAS)]
    with ThreadPoolExecutor(REPLICAS) as pool:
        list(pool.map(lambda s: s.start(), replicas))
    ports = [int(s.url.rsplit(":", 1)[1]) for s in replicas]
    listen = _free_port()
    lb = Nginx(nginx_bin, deploy_config(ports, listen), tmp_path / "nginx")
    try:
        base = f"http://127.0.0.1:{listen}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and lb.proc.poll() is None, lb.proc.stderr.read().decode()
            time.sleep(0.2)
        convs = [Conversation(i) for i in range(CONVERSATIONS)]
        done_turns: list = []
        killed = threading.Event()

        def killer():
            while len(done_turns) < KILL_AFTER:
                time.sleep(0.05)
            replicas[0].proc.send_signal(signal.SIGKILL)
            killed.set()

        threading.Thread(target=killer, daemon=True).start()

        def drive(group: list[Conversation]):
            with httpx.Client(base_url=base, timeout=120) as http:
                for c in group:
                    c.run(http, done_turns, killed)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(drive, [convs[i::6] for i in range(6)]))
        assert killed.is_set()
        # Every answer equals a cache-less computation of its whole history (another salt shares no state).
        with httpx.Client(base_url=base, timeout=120) as http:
            for c in convs:
                assert len(c.history) == 2 * TURNS
                for k in range(TURNS):
                    ref = _turn(http, c.cid, c.history[:2 * k + 1], f"reference-{c.cid}-{k}", header=False)
                    assert ref["done"] and ref["text"] == c.history[2 * k + 1]["content"], (c.cid, k, ref)
            r = http.post(_CHAT, headers={"X-Conversation-Id": "a"}, json={
                "model": NAME, "messages": [{"role": "user", "content": "hi"}], "conversation_id": "b"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "conflicting_conversation_id", r.text
        before = [(cached, length) for c in convs for killed_, cached, length in c.hits if not killed_]
        exact = sum(cached == length for cached, length in before)
        print(f"\n[replicas] {exact}/{len(before)} turns before the kill attached the whole committed state")
        assert before and exact >= 0.95 * len(before), before
    finally:
        lb.stop()
        for s in replicas:
            s.stop()
