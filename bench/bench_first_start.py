"""A first start, as a new user meets it: `python -m serving` with an empty compilation cache, timed from the
process start to healthy, to the answer of README's first curl, and to the third turn of README's first
conversation; then how long the background warm-up took to compile the rest. Prints one line per run and the
machine's load average.

    python -m bench.bench_first_start                       # the embedded default model, 3 runs
    python -m bench.bench_first_start --model DIR --runs 1 --max-tokens 16  # a checkpoint (random_checkpoint's)
    python -m bench.bench_first_start --warmup all          # the old way: every program before healthy

Each run uses a new empty compilation cache directory and a free port; server logs go to a file (not a terminal),
as under a process manager.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TURNS = ("My name is Marcus.", "Do you like tea?", "What is my name?")  # README's first conversation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def _chat(base: str, message: str, max_tokens: int | None) -> dict:
    body = {"conversation_id": "first-chat", "cache_salt": "readme", "temperature": 0,
            "messages": [{"role": "user", "content": message}]}
    body = json.dumps(body | ({"max_tokens": max_tokens} if max_tokens else {})).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.load(r)


def _programs(base: str) -> tuple[int, int]:
    _, text = _get(base + "/metrics", 30)
    return tuple(int(float(re.search(rf"^hybrid_serve_step_programs_{k} (\S+)$", text, re.M).group(1)))
                 for k in ("compiled", "total"))


def run_once(extra: list[str], log_path: str, cache_dir: str, timeout: float, max_tokens: int | None) -> dict:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving", "--port", str(port), "--compilation-cache-dir", cache_dir, *extra]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        out = {}
        while True:
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"server not healthy (exit {proc.returncode}); see {log_path}")
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        out["healthy_s"] = time.perf_counter() - t0
        out["compiled_when_healthy"], out["programs"] = _programs(base)
        answers = []
        for i, message in enumerate(TURNS):
            r = _chat(base, message, max_tokens)
            answers.append(r["choices"][0]["message"]["content"])
            out[f"turn{i + 1}_s"] = time.perf_counter() - t0
        out["answers"] = answers
        while _programs(base)[0] < out["programs"] and time.perf_counter() - t0 < timeout:
            time.sleep(0.5)
        out["all_compiled_s"] = time.perf_counter() - t0
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: the embedded model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", default=None, choices=("first", "all"), help="passed to the server")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="max_tokens of each turn (random weights rarely stop on their own); default: none, as README")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds a run may take")
    ap.add_argument("--keep-logs", default=None, help="copy each run's server log into this folder")
    args = ap.parse_args(argv)
    extra = (["--model", args.model] if args.model else []) + (["--warmup", args.warmup] if args.warmup else [])
    print(f"python -m serving {' '.join(extra)}; load average before: {os.getloadavg()}", flush=True)
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            log_path = os.path.join(args.keep_logs or tmp, f"first_start_{i}.log")
            r = run_once(extra, log_path, os.path.join(tmp, "jax"), args.timeout, args.max_tokens)
            with open(log_path) as f:
                warm = re.search(r"warm-up: (\d+) step programs ready in ([0-9.]+)s", f.read())
        print(f"run {i}: healthy {r['healthy_s']:.1f}s ({r['compiled_when_healthy']}/{r['programs']} step "
              f"programs compiled, {warm.group(1)} in {warm.group(2)}s before it), first answer "
              f"{r['turn1_s']:.1f}s, third {r['turn3_s']:.1f}s, all programs {r['all_compiled_s']:.1f}s; "
              f"answers {r['answers']}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
