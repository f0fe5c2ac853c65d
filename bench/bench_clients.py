"""A replay of mixed client behaviour against the cache modes: hit rate and time to first token.

    python -m bench.bench_clients --name clients_cpu

Each conversation is played the way one kind of client plays it (through `Engine.chat_stream`, the server's
own path): `suffix` (conversation_id, only the new message), `history` (the whole history, no id: how the
OpenAI SDK and most frameworks work), `regenerate` (the last answer asked again), `edit` (the last user message
changed), `fork` (a new branch from turn 2), `system` (new conversations that open with one long shared system
prompt). Reported per mode (`exact`: token-addressed checkpoints; `align`: state kept only at block boundaries,
as block-aligned engines do; `none`: recompute) and behaviour: the share of prompt tokens served from the cache
and the median TTFT. Results: docs/benchmarks/<name>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")
FACTS = ["My name is Zora.", "What is 3+4?", "I live in Oslo.", "Do you like music?", "What is my name?",
         "Where do I live?"]
SYSTEM = ("You are a careful assistant. You remember what the user tells you and answer briefly. " * 6)[:480]


def _turn(engine, messages, **ids):
    t0 = time.perf_counter()
    h = engine.chat_stream(messages, max_tokens=16, temperature=0, **ids)
    it = iter(h)
    next(it, None)
    ttft = time.perf_counter() - t0
    r = h.result()
    return r, ttft


def _play(engine, kind: str, n: int, salt: str):
    """One conversation of a kind; returns [(prompt_tokens, cached_tokens, ttft)] of the measured turns."""
    out, history = [], []
    conv = {"conversation_id": f"{kind}-{n}"} if kind == "suffix" else {}
    opening = [{"role": "system", "content": SYSTEM}] if kind == "system" else []
    turns = FACTS if kind in ("suffix", "history") else FACTS[:4]
    for i, text in enumerate(turns):
        history.append({"role": "user", "content": f"{text} ({n})" if i == 0 else text})
        sent = history[-1:] if kind == "suffix" and i else opening + history
        r, ttft = _turn(engine, sent, cache_salt=salt, **conv)
        history.append({"role": "assistant", "content": r.text})
        if kind in ("suffix", "history") and i:
            out.append((r.prompt_tokens, r.cached_tokens, ttft))
        if kind == "system" and i == 0:
            out.append((r.prompt_tokens, r.cached_tokens, ttft))
    if kind == "regenerate":
        out.append(_measure(engine, opening + history[:-1], salt))
    elif kind == "edit":
        out.append(_measure(engine, history[:-2] + [{"role": "user", "content": "Where do I live now?"}], salt))
    elif kind == "fork":
        out.append(_measure(engine, history[:4] + [{"role": "user", "content": "Where do I live?"}], salt))
    return out


def _measure(engine, messages, salt):
    r, ttft = _turn(engine, messages, cache_salt=salt)
    return r.prompt_tokens, r.cached_tokens, ttft


def run(args) -> list[dict]:
    from serving import Engine
    rows = []
    for mode, bs in (("exact", 16), ("align", 64), ("none", 16)):
        e = Engine.from_pretrained(None, cache_mode=mode, block_size=bs, max_model_len=2048)
        e.warmup(progress=False)
        for kind in ("suffix", "history", "regenerate", "edit", "fork", "system"):
            pts = [p for n in range(args.conversations) for p in _play(e, kind, n, f"{mode}-{kind}")]
            prompt, cached = sum(p for p, _, _ in pts), sum(c for _, c, _ in pts)
            rows.append({"mode": mode if mode != "align" else f"align{bs}", "client": kind, "turns": len(pts),
                         "cached_share": round(cached / prompt, 3),
                         "ttft_ms_median": round(1e3 * statistics.median(t for _, _, t in pts), 2)})
            print(rows[-1], flush=True)
        e.shutdown()
    return rows


def _markdown(rows, device, cmd, load) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lines = [f"# Mixed clients against the cache modes ({device})", "", f"Command: `{cmd}`", "",
             f"Machine load (1-minute load average) before and after: {load}.", "",
             "Share of prompt tokens served from the cache / median TTFT (ms) of the measured turns.", "",
             "| client | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for kind in dict.fromkeys(r["client"] for r in rows):
        cells = [next(f"{r['cached_share']:.0%} / {r['ttft_ms_median']}" for r in rows
                      if r["client"] == kind and r["mode"] == m) for m in modes]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_clients")
    p.add_argument("--conversations", type=int, default=4, help="conversations per client kind and mode")
    p.add_argument("--name", default=None, help="write docs/benchmarks/NAME.json and NAME.md")
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    rows = run(args)
    load = f"{load0:.2f} / {os.getloadavg()[0]:.2f}"
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cores)"
    if args.name:
        cmd = "python -m bench.bench_clients " + " ".join(argv if argv is not None else os.sys.argv[1:])
        with open(os.path.join(OUT_DIR, args.name + ".json"), "w") as f:
            json.dump({"device": device, "load": load, "rows": rows}, f, indent=1)
        with open(os.path.join(OUT_DIR, args.name + ".md"), "w") as f:
            f.write(_markdown(rows, device, cmd, load))


if __name__ == "__main__":
    main()
