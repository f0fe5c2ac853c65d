"""`python -m serving.batch`: the offline batch job over the OpenAI batch format.

One input file holds 3 conversations x 3 turns, interleaved, plus malformed lines and requests the server would
reject. It is run in-process through `main(argv)` and once as a real `python -m serving.batch` subprocess, and
checked for: one output line per input line, file order within each conversation, exact cache reuse from turn 2
(cached = previous prompt + completion - 1), the same answers as `Engine.chat` turn by turn and as the HTTP
server (`serving.app` through FastAPI's TestClient), the server's errors for bad requests, and re-runs that skip
what is done (including a resumed conversation and a truncated last line).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving import Engine
from serving.batch import main

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 5
ENGINE_KW = dict(block_size=16, max_model_len=256, max_num_seqs=4)
CLI_KW = ["--block-size", "16", "--max-model-len", "256", "--max-num-seqs", "4", "--concurrency", "3"]
URL = "/v1/chat/completions"

TURNS = {  # conversation -> user messages of its turns (each request sends only the new suffix)
    "conv-a": ["Hi, I am Ada.", "What is my name?", "Thanks!"],
    "conv-b": ["Tell me about caches.", "And Mamba state?", "ok"],
    "conv-c": ["x", "Count from one to five please.", "bye"],
}
SYSTEM = {"role": "system", "content": "You are terse."}


def _turn_body(conv: str, t: int, salt: str = "tenant-1") -> dict:
    msgs = [{"role": "user", "content": TURNS[conv][t]}]
    if conv == "conv-a" and t == 0:
        msgs.insert(0, SYSTEM)
    return {"messages": msgs, "max_tokens": MAX_TOKENS, "temperature": 0,
            "conversation_id": conv, "cache_salt": salt}


def _line(custom_id, body, url=URL, method="POST") -> str:
    obj = {"method": method, "url": url, "body": body}
    if custom_id is not None:
        obj["custom_id"] = custom_id
    return json.dumps(obj)


def _cid(conv, t):
    return f"{conv}-t{t}"


# custom_id -> expected error code, for the lines that must fail
BAD = {
    "bad-url": "invalid_url", "bad-method": "invalid_method", "bad-temp": "invalid_value",
    "bad-role": "invalid_value", "no-messages": "invalid_value", "too-long": "context_length_exceeded",
    "bad-model": "model_not_found", "conv-b-bad": "invalid_value",
}
REQUEST_ERRORS = ("bad-temp", "bad-role", "no-messages", "too-long", "bad-model", "conv-b-bad")


def _input_lines() -> list[str]:
    user = [{"role": "user", "content": "hello"}]
    lines = []
    order = [("conv-a", 0), ("conv-b", 0), ("conv-c", 0), ("conv-b", 1), ("conv-a", 1), ("conv-c", 1),
             ("conv-c", 2), ("conv-a", 2), ("conv-b", 2)]
    for i, (conv, t) in enumerate(order):
        lines.append(_line(_cid(conv, t), _turn_body(conv, t)))
        if i == 1:
            lines.append("{this is not json")
            lines.append(_line("bad-url", {"messages": user}, url="/v1/embeddings"))
            lines.append(_line("conv-b-bad", dict(_turn_body("conv-b", 1), temperature=9)))  # inside conv-b
        if i == 3:
            lines.append(_line(None, {"messages": user}))  # no custom_id
            lines.append(_line("bad-method", {"messages": user}, method="GET"))
            lines.append("")  # blank lines are ignored
            lines.append(_line("bad-temp", {"messages": user, "temperature": 5}))
            lines.append(_line("single", {"messages": user, "max_tokens": MAX_TOKENS, "temperature": 0}))
        if i == 5:
            lines.append(_line("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}))
            lines.append(_line("no-messages", {"max_tokens": 3}))
            lines.append(_line("too-long", {"messages": [{"role": "user", "content": "y" * 400}]}))
            lines.append(_line("bad-model", {"model": "some-other-model", "messages": user}))
            lines.append("[1, 2, 3]")
    lines.append(_line(_cid("conv-a", 0), _turn_body("conv-a", 0)))  # duplicate custom_id
    return lines


def _read(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _by_id(recs) -> dict:
    return {r["custom_id"]: r for r in recs if r["custom_id"] is not None and
            (r["error"] is None or r["error"]["code"] != "duplicate_custom_id")}


def _content(rec) -> str:
    return rec["response"]["body"]["choices"][0]["message"]["content"]


def _strip(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


@pytest.fixture(scope="module")
def batch_run(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    inp, out = d / "requests.jsonl", d / "results.jsonl"
    lines = _input_lines()
    inp.write_text("\n".join(lines) + "\n")
    rc = main(["-i", str(inp), "-o", str(out), "--model", tiny_model_dir, "--no-progress", *CLI_KW])
    assert rc == 0
    return dict(dir=d, input=inp, output=out, lines=lines, records=_read(out), model=tiny_model_dir)


def test_one_line_per_input_and_errors(batch_run):
    recs, lines = batch_run["records"], batch_run["lines"]
    assert len(recs) == sum(1 for x in lines if x.strip())
    for r in recs:
        assert set(r) == {"id", "custom_id", "response", "error"}
        assert (r["response"] is None) != (r["error"] is None)
        if r["error"] is not None:
            assert set(r["error"]) >= {"code", "message", "line", "status_code", "type", "param"}
            assert lines[r["error"]["line"] - 1].strip()
    errors = {r["custom_id"]: r["error"] for r in recs if r["error"] is not None}
    for cid, code in BAD.items():
        assert errors[cid]["code"] == code, (cid, errors[cid])
    assert errors["bad-url"]["status_code"] == 404 and errors["bad-model"]["status_code"] == 404
    anon = sorted(e["code"] for r in recs if r["custom_id"] is None for e in [r["error"]])
    assert anon == ["invalid_custom_id", "invalid_json", "invalid_line"]
    dup = [r for r in recs if r["error"] is not None and r["error"]["code"] == "duplicate_custom_id"]
    assert len(dup) == 1 and dup[0]["custom_id"] == "conv-a-t0" and dup[0]["error"]["line"] == len(lines)
    ok = {r["custom_id"] for r in recs if r["error"] is None}
    assert ok == {_cid(c, t) for c in TURNS for t in range(3)} | {"single"}
    for r in recs:
        if r["error"] is None:
            body = r["response"]["body"]
            assert r["response"]["status_code"] == 200
            assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
            assert body["model"] == os.path.basename(batch_run["model"])
            ch = body["choices"]
            assert len(ch) == 1 and ch[0]["message"]["role"] == "assistant" and ch[0]["logprobs"] is None
            assert ch[0]["finish_reason"] in ("stop", "length")
            u = body["usage"]
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
            assert 1 <= u["completion_tokens"] <= MAX_TOKENS


def test_order_within_conversations_and_cache_reuse(batch_run):
    recs = batch_run["records"]
    in_order = {}
    for x in batch_run["lines"]:
        try:
            obj = json.loads(x)
            conv = obj["body"]["conversation_id"]
        except (ValueError, KeyError, TypeError):
            continue
        in_order.setdefault(conv, []).append(obj["custom_id"])
    for conv, ids in in_order.items():
        out_ids = [r["custom_id"] for r in recs if r["custom_id"] in ids]
        assert out_ids == ids, conv
    got = _by_id(recs)
    for conv in TURNS:
        usage = [got[_cid(conv, t)]["response"]["body"]["usage"] for t in range(3)]
        assert usage[0]["prompt_tokens_details"]["cached_tokens"] == 0
        for t in (1, 2):
            prev = usage[t - 1]
            cached = usage[t]["prompt_tokens_details"]["cached_tokens"]
            assert cached == prev["prompt_tokens"] + prev["completion_tokens"] - 1 > 0, (conv, t)
            assert usage[t]["prompt_tokens"] > cached


def test_same_answers_as_engine_chat_and_server(batch_run):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    got = _by_id(batch_run["records"])
    engine = Engine.from_pretrained(batch_run["model"], **ENGINE_KW)
    try:
        # Engine.chat, turn by turn in order, one conversation after another.
        for conv in TURNS:
            for t in range(3):
                b = _turn_body(conv, t)
                r = engine.chat(b["messages"], conversation_id=conv, cache_salt=b["cache_salt"],
                                max_tokens=MAX_TOKENS, temperature=0)
                rec = got[_cid(conv, t)]["response"]["body"]
                assert rec["choices"][0]["message"]["content"] == r.text, (conv, t)
                assert rec["choices"][0]["finish_reason"] == r.finish_reason
                assert rec["usage"]["prompt_tokens"] == r.prompt_tokens
                assert rec["usage"]["completion_tokens"] == r.completion_tokens
                assert rec["usage"]["prompt_tokens_details"]["cached_tokens"] == r.cached_tokens
        # The HTTP server on the same engine (another salt: fresh conversations), bodies equal but for id/created.
        with TestClient(create_app(engine)) as client:
            for conv in TURNS:
                for t in range(3):
                    resp = client.post(URL, json=_turn_body(conv, t, salt="tenant-2"))
                    assert resp.status_code == 200, resp.text
                    assert _strip(resp.json()) == _strip(got[_cid(conv, t)]["response"]["body"]), (conv, t)
            # Requests the server rejects are the batch's error lines, with the same status and error.
            by_line = {i + 1: x for i, x in enumerate(batch_run["lines"])}
            errors = {r["custom_id"]: r["error"] for r in batch_run["records"] if r["error"] is not None}
            for cid in REQUEST_ERRORS:
                body = json.loads(by_line[errors[cid]["line"]])["body"]
                if cid == "conv-b-bad":
                    body["cache_salt"] = "tenant-3"
                resp = client.post(URL, json=body)
                want = resp.json()["error"]
                assert resp.status_code == errors[cid]["status_code"], cid
                assert {k: errors[cid][k] for k in ("message", "type", "param")} == \
                    {k: want[k] for k in ("message", "type", "param")}, cid
                assert errors[cid]["code"] == (want["code"] or want["type"]), cid
    finally:
        engine.shutdown()


def test_cli_subprocess(batch_run):
    out = batch_run["dir"] / "cli.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "serving.batch", "-i", str(batch_run["input"]), "-o", str(out),
                        "--model", batch_run["model"], *CLI_KW], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "requests: 22 in the input, 0 already done, 22 run (10 ok, 12 errors)" in p.stdout, p.stdout
    assert "generated tok/s" in p.stdout
    recs = _read(out)
    assert len(recs) == len(batch_run["records"])
    a, b = _by_id(batch_run["records"]), _by_id(recs)
    assert a.keys() == b.keys()
    for cid in a:
        if a[cid]["error"] is None:
            assert _strip(a[cid]["response"]["body"]) == _strip(b[cid]["response"]["body"]), cid
        else:
            assert {k: v for k, v in a[cid].items() if k != "id"} == {k: v for k, v in b[cid].items() if k != "id"}


def test_rerun_skips_done_and_resumes(batch_run):
    d, full = batch_run["dir"], batch_run["records"]
    # A complete output: nothing runs, nothing is appended.
    out = d / "rerun.jsonl"
    out.write_text(batch_run["output"].read_text())
    before = out.read_bytes()
    assert main(["-i", str(batch_run["input"]), "-o", str(out), "--model", batch_run["model"], "--no-progress",
                 *CLI_KW]) == 0
    assert out.read_bytes() == before
    # An interrupted run: the last turns missing, conv-c stopped after its first turn, a half-written last line.
    drop = {_cid(c, 2) for c in TURNS} | {_cid("conv-c", 1), "bad-temp"}
    kept = [r for r in full if r["custom_id"] not in drop]
    part = d / "partial.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    part.write_text(text + json.dumps(_by_id(full)["bad-temp"])[:40])
    assert main(["-i", str(batch_run["input"]), "-o", str(part), "--model", batch_run["model"], "--no-progress",
                 *CLI_KW]) == 0
    assert part.read_text().startswith(text)  # what was done stays as it was
    recs = _read(part)
    assert len(recs) == len(full)
    assert sorted(map(json.dumps, (r["custom_id"] for r in recs))) == \
        sorted(map(json.dumps, (r["custom_id"] for r in full)))
    new = {r["custom_id"]: r for r in recs[len(kept):]}
    assert set(new) == drop
    assert new["bad-temp"]["error"] == _by_id(full)["bad-temp"]["error"]
    ref = _by_id(full)
    engine = Engine.from_pretrained(batch_run["model"], **ENGINE_KW)
    try:
        for conv in TURNS:
            # The first resumed turn recomputes the whole history (the done turns' messages and their answers
            # from the output), then the conversation goes on from the cache: as a client sending that history.
            first = 1 if conv == "conv-c" else 2
            u = new[_cid(conv, first)]["response"]["body"]["usage"]
            assert u["prompt_tokens_details"]["cached_tokens"] == 0
            history = []
            for t in range(first):
                history += _turn_body(conv, t)["messages"] + [{"role": "assistant",
                                                               "content": _content(ref[_cid(conv, t)])}]
            for t in range(first, 3):
                msgs = _turn_body(conv, t)["messages"]
                r = engine.chat(history + msgs if t == first else msgs, conversation_id=conv, cache_salt="resume",
                                max_tokens=MAX_TOKENS, temperature=0)
                body = new[_cid(conv, t)]["response"]["body"]
                assert (_content(new[_cid(conv, t)]), body["usage"]["prompt_tokens"],
                        body["usage"]["prompt_tokens_details"]["cached_tokens"]) == \
                    (r.text, r.prompt_tokens, r.cached_tokens), (conv, t)
            if not any("\ufffd" in m["content"] for m in history):
                # Text answers round-trip exactly, so the prompt and answer are the original ones (a byte-level
                # model can emit bytes that are not UTF-8, which text cannot carry; then the history differs).
                assert u["prompt_tokens"] == ref[_cid(conv, first)]["response"]["body"]["usage"]["prompt_tokens"]
                for t in range(first, 3):
                    assert _content(new[_cid(conv, t)]) == _content(ref[_cid(conv, t)]), (conv, t)
    finally:
        engine.shutdown()
    u2 = new[_cid("conv-c", 2)]["response"]["body"]["usage"]
    assert u2["prompt_tokens_details"]["cached_tokens"] > 0  # after the resumed turn, the cache is used again


# ------------------------------------------------------------------------------------------------------------
# README's example, as written
# ------------------------------------------------------------------------------------------------------------

def _shown(expected, actual, path="") -> list[str]:
    """Where `actual` differs from what README shows: README elides values ("batch_req_...": any value with that
    prefix) and the rest of an object (", ..."); everything it does show must be there."""
    if isinstance(expected, dict):
        return [m for k, v in expected.items() for m in
                ([f"{path}.{k} missing"] if k not in actual else _shown(v, actual[k], f"{path}.{k}"))]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: {actual!r}"]
        return [m for i, (e, a) in enumerate(zip(expected, actual)) for m in _shown(e, a, f"{path}[{i}]")]
    if isinstance(expected, str) and expected.endswith("..."):
        return [] if str(actual).startswith(expected[:-3]) else [f"{path}: {actual!r}"]
    return [] if expected == actual else [f"{path}: README shows {expected!r}, the run gives {actual!r}"]


def test_readme_example_runs_as_written(tmp_path):
    """README's requests.jsonl, run with README's command on the embedded default model, gives the output line
    README shows."""
    section = (ROOT / "README.md").read_text().split("## Offline batches", 1)[1].split("\n## ", 1)[0]
    command, requests, shown = re.findall(r"```\w*\n(.*?)```", section, re.S)[:3]
    (tmp_path / "requests.jsonl").write_text(requests)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = command.split()
    assert argv[:3] == ["python", "-m", "serving.batch"]
    p = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    expected = json.loads(shown.strip().replace(", ...}", "}"))
    got = _by_id(_read(tmp_path / "results.jsonl"))[expected["custom_id"]]
    assert _shown(expected, got) == []
