"""The exact conversation cache engine: I1 (exact = align = none), I3 (cancel leaves no trace), I7 (tiny pool),
and many interleaved conversations."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from hybrid_jax import ledger as L
from conftest import fail_prefill_steps
from serving import Engine

COMMON = dict(block_size=16, max_model_len=256, max_num_seqs=8, max_prefill_tokens=64)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    es = {m: Engine.from_pretrained(tiny_model_dir, cache_mode=m, **COMMON) for m in ("exact", "align", "none")}
    yield es
    for e in es.values():
        e.shutdown()


def _raw_conversation(engine, cid, turns, salt="s"):
    out = []
    for prompt, max_tokens in turns:
        r = engine.complete(prompt, conversation_id=cid, cache_salt=salt, max_tokens=max_tokens, temperature=0,
                            ignore_eos=True)
        out.append(r)
    return out


def _random_turns(seed, n=6):
    rng = np.random.RandomState(seed)
    lengths = [37, 1, 70, 5, 1, 23][:n]  # 1-token suffixes and suffixes crossing several 16-token blocks
    rng.shuffle(lengths)
    return [(rng.randint(0, 256, size=k).tolist(), int(rng.randint(1, 9))) for k in lengths]


def test_I1_raw_turns_exact_align_none_agree(engines):
    turns = _random_turns(0)
    res = {m: _raw_conversation(e, "i1-raw", turns) for m, e in engines.items()}
    for m in ("exact", "align"):
        assert [r.token_ids for r in res[m]] == [r.token_ids for r in res["none"]], m
    committed = 0
    for i, (r_exact, r_align, r_none) in enumerate(zip(res["exact"], res["align"], res["none"])):
        if i > 0:
            assert r_exact.cached_tokens == committed > 0  # the whole committed length
            assert r_align.cached_tokens == (committed // 16) * 16  # only up to the last block boundary
        assert r_none.cached_tokens == 0
        committed = r_exact.prompt_tokens + r_exact.completion_tokens - 1


def test_I1_chat_turns(engines):
    qs = ["Hi, my name is Ada and I like long walks.", "ok", "What did I say my name was? Answer briefly please.",
          "x", "Tell me about the weather on the coast today, in detail.", "bye"]
    res = {}
    for m, e in engines.items():
        res[m] = [e.chat([{"role": "user", "content": q}], conversation_id="i1-chat", cache_salt="s",
                         max_tokens=6, temperature=0) for q in qs]
    for m in ("exact", "align"):
        assert [r.token_ids for r in res[m]] == [r.token_ids for r in res["none"]]
    for prev, r in zip(res["exact"], res["exact"][1:]):
        assert r.cached_tokens == prev.prompt_tokens + prev.completion_tokens - 1


def test_salt_isolation(engines):
    e = engines["exact"]
    e.chat([{"role": "user", "content": "secret"}], conversation_id="iso", cache_salt="tenant-a", max_tokens=3,
           temperature=0)
    for salt in ("tenant-b", None):
        r = e.chat([{"role": "user", "content": "hi"}], conversation_id="iso", cache_salt=salt, max_tokens=2,
                   temperature=0)
        assert r.cached_tokens == 0
    assert e.get_conversation("iso", "tenant-b") is not None  # its own new conversation
    assert e.get_conversation("iso", "tenant-a")["turns"] == 1


@pytest.mark.parametrize("abort_at", ["before_prefill", "mid_prefill", "mid_decode"])
def test_I3_cancelled_turn_leaves_no_trace(engines, abort_at):
    e, ref = engines["exact"], engines["none"]
    cid = f"i3-{abort_at}"
    first = _raw_conversation(e, cid, [(list(range(40, 70)), 4)])
    _raw_conversation(ref, cid, [(list(range(40, 70)), 4)])
    ledger_before, conv_before = e.ledger, e.conversations.get(("s", cid))
    long_prompt = list(np.random.RandomState(3).randint(0, 256, 150))  # several 64-token prefill chunks
    h = e.complete_stream(long_prompt, conversation_id=cid, cache_salt="s", max_tokens=50, temperature=0,
                          ignore_eos=True)
    if abort_at == "before_prefill":
        h.abort()
    elif abort_at == "mid_prefill":
        h.cached_tokens  # admitted: its prefill is under way
        h.abort()
    else:
        next(iter(h))  # first token streamed: decoding
        h.abort()
    assert h.result(timeout=60).finish_reason == "abort"
    assert e.ledger == ledger_before
    assert e.conversations.get(("s", cid)).ids == conv_before.ids
    L.check(e.ledger)
    nxt = _raw_conversation(e, cid, [(list(range(5)), 6)])[0]
    want = _raw_conversation(ref, cid, [(list(range(5)), 6)])[0]
    assert nxt.token_ids == want.token_ids
    assert nxt.cached_tokens == first[0].prompt_tokens + first[0].completion_tokens - 1


@pytest.mark.parametrize("host_cache", [0, "64MiB"])
def test_I7_tiny_pool_evicts_and_stays_exact(tiny_model_dir, engines, host_cache):
    """Far too few blocks and slots: evicted turns recompute (no host cache) or come back from host memory."""
    small = Engine.from_pretrained(tiny_model_dir, cache_mode="exact", block_size=16, max_model_len=256,
                                   max_num_seqs=2, num_blocks=40, num_slots=6, max_prefill_tokens=64,
                                   host_cache_memory=host_cache)
    try:
        convs = {f"i7-{i}": _random_turns(10 + i, n=3) for i in range(6)}
        got = {c: [] for c in convs}
        for round_ in range(3):  # round robin: each conversation's state is evicted before its next turn
            for c, turns in convs.items():
                got[c] += _raw_conversation(small, c, [turns[round_]])
        want = {c: _raw_conversation(engines["none"], f"{c}-ref-{host_cache}", turns) for c, turns in convs.items()}
        for c in convs:
            assert [r.token_ids for r in got[c]] == [r.token_ids for r in want[c]]
        stats = small.stats()
        assert stats["evictions"] > 0
        if host_cache:  # every turn after the first hits, through host memory
            assert stats["host_restores"] > 0
            for c in convs:
                for prev, r in zip(got[c], got[c][1:]):
                    assert r.cached_tokens == prev.prompt_tokens + prev.completion_tokens - 1
        else:
            assert stats["host_restores"] == 0
        L.check(small.ledger)
    finally:
        small.shutdown()


def test_32_interleaved_conversations(engines):
    e, ref = engines["exact"], engines["none"]
    convs = {f"many-{i}": _random_turns(100 + i, n=3) for i in range(32)}
    got, errors = {}, []

    def run(c):
        try:
            got[c] = _raw_conversation(e, c, convs[c])
        except Exception as ex:  # surfaced below
            errors.append(ex)

    threads = [threading.Thread(target=run, args=(c,)) for c in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for c, turns in convs.items():
        want = _raw_conversation(ref, c, turns)
        assert [r.token_ids for r in got[c]] == [r.token_ids for r in want], c
        assert got[c][2].cached_tokens == got[c][1].prompt_tokens + got[c][1].completion_tokens - 1
    L.check(e.ledger)


def test_stop_strings_are_cut_and_never_streamed(engines):
    e = engines["exact"]
    free = e.complete(list(range(30, 60)), max_tokens=24, temperature=0, ignore_eos=True)
    text = free.text
    stop = text[5:8]  # a stop string that the greedy continuation will produce
    h = e.complete_stream(list(range(30, 60)), max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    streamed = "".join(d.text for d in h)
    r = h.result()
    assert r.finish_reason == "stop"
    assert streamed == r.text == text[:text.find(stop)]


def test_no_recompilation_in_steady_state(engines):
    """A steady multi-turn workload compiles nothing once each bucket has been seen."""
    import jax

    e = engines["exact"]

    def workload(tag):
        for i in range(3):
            _raw_conversation(e, f"steady-{tag}-{i}", _random_turns(200 + i, n=4))

    workload("warm")
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    workload("timed")
    assert compiles == [], f"recompiled after warm-up: {compiles}"


def test_failed_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir, engines):
    e = Engine.from_pretrained(tiny_model_dir, cache_mode="exact", **COMMON)
    try:
        _raw_conversation(e, "survivor", [(list(range(20)), 3)])
        restore = fail_prefill_steps(e)
        r = e.complete(list(range(30)), max_tokens=3, temperature=0)
        assert r.finish_reason == "error" and "injected" in r.error
        restore()
        got = _raw_conversation(e, "survivor", [(list(range(7)), 4)])[0]
        want = _raw_conversation(engines["none"], "survivor-ref", [(list(range(20)), 3), (list(range(7)), 4)])[1]
        assert got.token_ids == want.token_ids  # recomputed from the conversation's committed tokens
        L.check(e.ledger)
    finally:
        e.shutdown()
