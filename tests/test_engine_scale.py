"""The engine at scale, checked structurally: no step copies a pool, the cache fits its budget, nothing compiles
after warm-up, and preemption under a pool far too small changes no output."""
from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hybrid_jax
from hybrid_jax import ledger as L
from hybrid_jax import offload
from hybrid_jax.cache import init_cache
from hybrid_jax.fused import FLOAT_FIELDS, INT_FIELDS, NUM_STOP, make_serving_steps, neutral_adjust
from hybrid_jax.model import SpanBatch, make_steps
from hybrid_jax.stack import stack_layers
from conftest import fail_prefill_steps
from serving import Engine

# Pool sizes no other array of the tiny model has, so a copy of a pool is recognised by its shape.
NUM_BLOCKS, NUM_SLOTS = 97, 89


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    cfg, params = hybrid_jax.load_pretrained(tiny_model_dir)
    return cfg, stack_layers(params, cfg)


def _pool_copies(compiled, cache) -> list[str]:
    """Instructions of a compiled program that copy a whole pool buffer (same shape as one of the pools)."""
    shapes = {tuple(x.shape) for x in jax.tree.leaves(cache)}
    bad = []
    for line in compiled.as_text().splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* (copy|copy-start)\(", line)
        if m and tuple(int(x) for x in m.group(1).split(",") if x) in shapes:
            bad.append(line.strip()[:160])
    return bad


def _cache(cfg):
    return init_cache(cfg, num_blocks=NUM_BLOCKS, block_size=16, num_slots=NUM_SLOTS)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_no_step_program_copies_a_pool(model, rows):
    cfg, params = model
    cache = _cache(cfg)
    prefill, _, decode = make_steps(cfg)
    i32 = lambda *s: jnp.ones(s, jnp.int32)
    for fn, T in ((decode, 1), (prefill, 16)):
        batch = SpanBatch(i32(rows, T), i32(rows), i32(rows), i32(rows), i32(rows, 4))
        assert _pool_copies(fn.lower(params, cache, batch).compile(), cache) == []
    # the engine's fused steps (packed inputs, sampling inside)
    fprefill, fdecode = make_serving_steps(cfg, 8)
    for T in (1, 16):
        ints = jnp.zeros((rows, T + NUM_STOP + len(INT_FIELDS) + 4), jnp.int32)
        floats = jnp.zeros((rows, len(FLOAT_FIELDS)), jnp.float32)
        masks, bias = neutral_adjust(rows, cfg.vocab_size)
        if T == 1:
            compiled = fdecode.lower(params, cache, ints, floats, masks, bias, jnp.zeros(8, jnp.int32)).compile()
        else:
            compiled = fprefill.lower(params, cache, ints, floats, masks, bias, T=T).compile()
        assert _pool_copies(compiled, cache) == []


def test_cache_programs_do_not_copy_a_pool(model):
    cfg, _ = model
    cache = _cache(cfg)
    one = jnp.ones((1,), jnp.int32)
    assert _pool_copies(L.copy_block_in_place.lower(cache, one, one).compile(), cache) == []
    assert _pool_copies(L.copy_slot_in_place.lower(cache, one, one).compile(), cache) == []
    idx = jnp.ones((4,), jnp.int32)
    k, v, conv, ssm = offload.gather_arrays(cache, idx, 1)
    assert _pool_copies(offload.scatter_arrays.lower(cache, idx, 1, k, v, conv, ssm).compile(), cache) == []


def test_live_engine_cache_within_its_budget(tiny_model_dir):
    budget = 3 * 2 ** 20
    e = Engine.from_pretrained(tiny_model_dir, kv_memory=budget, max_model_len=512, max_num_seqs=4)
    try:
        s = e.stats()
        allocated = sum(x.nbytes for x in jax.tree.leaves(e.cache))
        assert s["cache_bytes"] == allocated <= budget
        assert s["kv_blocks_total"] * 16 >= 512  # one full-length sequence fits
    finally:
        e.shutdown()


def _prompts(n, seed):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, int(rng.choice([1, 5, 17, 40, 90, 130, 300]))).tolist() for _ in range(n)]


def _run_concurrently(engine, prompts, **sampling):
    handles = [engine.complete_stream(p, **sampling) for p in prompts]
    return [h.result() for h in handles]


def test_nothing_compiles_after_warmup(tiny_model_dir, caplog):
    e = Engine.from_pretrained(tiny_model_dir, max_model_len=512, max_num_seqs=4, max_prefill_tokens=64,
                               num_blocks=40, num_slots=7, host_cache_memory="64MiB")
    try:
        info = e.warmup(progress=False)
        n = info["programs"]
        assert n > 0
        with caplog.at_level(logging.INFO, logger="serving.runner"):  # how far it got, in the log (no terminal)
            e._call(lambda: e.runner.warmup(progress=False, log_every=0))
        said = [r.getMessage().split(" (")[0] for r in caplog.records if "programs compiled" in r.getMessage()]
        assert said == [f"warm-up: {k}/{n} step programs compiled" for k in range(1, n)]
        compiles = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
        rng = np.random.RandomState(0)
        for n in (1, 2, 3, 4, 4):  # 1 to max_num_seqs concurrent requests, greedy and sampled
            temp = float(rng.choice([0.0, 0.8]))
            _run_concurrently(e, _prompts(n, int(rng.randint(1 << 20))), max_tokens=int(rng.randint(1, 30)),
                              temperature=temp, top_p=0.9)
        for i in range(8):  # conversations that outgrow the pool: eviction to the host tier and back
            for turn in range(3):
                e.complete(_prompts(1, 100 * i + turn)[0][:60], conversation_id=f"c{i % 5}", max_tokens=5,
                           temperature=0)
        assert e.stats()["offloads"] > 0
        assert compiles == [], f"compiled while serving: {compiles}"
    finally:
        e.shutdown()


def test_a_fault_read_a_step_later_fails_only_that_steps_rows(tiny_model_dir):
    """A device fault that surfaces only when a decode step's results are read (a step after its dispatch, as
    asynchronous dispatch reports it) fails the rows of that step alone: a request still prefilling beside them
    finishes exactly as in a clean run, and the engine keeps serving."""
    long_prompt = np.random.RandomState(5).randint(0, 256, 300).tolist()
    clean = Engine.from_pretrained(tiny_model_dir, max_prefill_tokens=16)
    e = Engine.from_pretrained(tiny_model_dir, max_prefill_tokens=16)
    try:
        want = clean.complete(long_prompt, max_tokens=8, temperature=0)
        victim = e.complete_stream([1, 2, 3], max_tokens=400, temperature=0, ignore_eos=True)
        next(iter(victim))  # decoding
        real, armed = e.runner.decode, [True]

        def decode(reqs, *a, **kw):
            out = real(reqs, *a, **kw)
            if armed[0] and any(r.in_prefill for r in e.scheduler.running):  # the bystander is prefilling
                armed[0] = False
                dead = jnp.zeros_like(out.logprob)
                dead.delete()
                out = out.replace(logprob=dead)  # dispatched fine; reading its results fails
            return out
        e.runner.decode = decode
        bystander = e.complete_stream(long_prompt, max_tokens=8, temperature=0)
        got, lost = bystander.result(timeout=120), victim.result(timeout=120)
        assert not armed[0] and lost.finish_reason == "error", lost
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason, got
        assert e.complete([4, 5, 6], max_tokens=4, temperature=0).finish_reason in ("stop", "length")
        L.check(e.ledger)
    finally:
        clean.shutdown()
        e.shutdown()


def test_preemption_gives_the_unpressured_outputs(tiny_model_dir):
    prompts = _prompts(6, 7)
    kw = dict(max_model_len=512, max_num_seqs=6, max_prefill_tokens=64)
    roomy = Engine.from_pretrained(tiny_model_dir, **kw)
    # 34 usable blocks: one 512-token sequence fits, six growing ones do not
    tight = Engine.from_pretrained(tiny_model_dir, num_blocks=35, **kw)
    try:
        want = _run_concurrently(roomy, prompts, max_tokens=60, temperature=0, ignore_eos=True)
        got = _run_concurrently(tight, prompts, max_tokens=60, temperature=0, ignore_eos=True)
        assert tight.stats()["preemptions"] > 0
        for g, w in zip(got, want):
            assert g.finish_reason == "length" and g.completion_tokens == 60
            assert g.token_ids == w.token_ids
        L.check(tight.ledger)
    finally:
        roomy.shutdown()
        tight.shutdown()


def test_async_scheduling_gives_the_synchronous_outputs(tiny_model_dir):
    """Step N+1 dispatched before step N's tokens are read: same tokens, stop tokens never committed."""
    prompts = _prompts(4, 11)
    sync = Engine.from_pretrained(tiny_model_dir, async_scheduling=False)
    fast = Engine.from_pretrained(tiny_model_dir)
    try:
        free = _run_concurrently(sync, prompts, max_tokens=40, temperature=0, ignore_eos=True)
        stops = sorted({r.token_ids[12] for r in free[:2]})  # tokens the runs do produce: turns end on them
        for temp in (0.0, 0.9):
            a = _run_concurrently(sync, prompts, max_tokens=40, temperature=temp, seed=3, stop_token_ids=stops)
            b = _run_concurrently(fast, prompts, max_tokens=40, temperature=temp, seed=3, stop_token_ids=stops)
            assert [r.token_ids for r in a] == [r.token_ids for r in b]
        # a conversation whose turns end on stop tokens continues exactly as the synchronous engine's does
        outs = []
        for eng in (sync, fast):
            res = [eng.complete(p[:30], conversation_id="stops", max_tokens=40, temperature=0,
                                stop_token_ids=stops) for p in prompts]
            outs.append([(r.token_ids, r.cached_tokens, r.finish_reason) for r in res])
        assert outs[0] == outs[1]
        assert any(reason == "stop" for _, _, reason in outs[1])
        L.check(fast.ledger)
    finally:
        sync.shutdown()
        fast.shutdown()


@pytest.mark.parametrize("where", ["output", "step_losing_the_cache"])
def test_a_failure_is_confined_to_its_request(tiny_model_dir, where):
    """A request that makes its step (or its output processing) fail fails alone: the streams running beside it
    finish with the outputs of a clean run, also when the failed step took the donated cache with it; then a
    conversation in the host tier still continues from its state, and one whose state was on the device
    continues exactly, recomputed from its tokens."""
    prompts = _prompts(3, 21)
    clean = Engine.from_pretrained(tiny_model_dir)
    e = Engine.from_pretrained(tiny_model_dir)
    try:
        want = _run_concurrently(clean, prompts, max_tokens=40, temperature=0, ignore_eos=True)
        turn = dict(cache_salt="t", max_tokens=4, temperature=0)
        for engine in (clean, e):
            for cid, last in (("on-host", 8), ("on-device", 9)):
                engine.complete([5, 6, 7, last], conversation_id=cid, **turn)
        e._call(lambda: e.caches.evict_one(keep=set(e.caches.index.heads.values()) - {
            e.caches.index.heads[("t", "on-host")]}))
        assert e.stats()["host_checkpoints"] == 1
        handles = [e.complete_stream(p, max_tokens=40, temperature=0, ignore_eos=True) for p in prompts]
        for h in handles:
            next(iter(h))  # all three are decoding
        if where == "output":
            real = e.output.emit
            e.output.emit = lambda r, *a: (_ for _ in ()).throw(ValueError("poisoned")) if r.sp.seed == 666 \
                else real(r, *a)
        else:
            fail_prefill_steps(e, lambda ints, T: (ints[:, T + NUM_STOP + INT_FIELDS.index("seed")] == 666).any())
        bad = e.complete([1, 2, 3], max_tokens=5, temperature=0, seed=666)
        assert bad.finish_reason == "error" and "poisoned" in bad.error
        got = [h.result(timeout=120) for h in handles]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert all(g.finish_reason == "length" for g in got)
        L.check(e.ledger)
        lost = where == "step_losing_the_cache"
        for cid in ("on-host", "on-device"):
            ref, got = (x.complete([9, 10], conversation_id=cid, **turn) for x in (clean, e))
            assert got.token_ids == ref.token_ids and got.prompt_tokens == ref.prompt_tokens, cid
            assert got.cached_tokens == (0 if lost and cid == "on-device" else ref.cached_tokens), cid
        assert e.stats()["host_restores"] == 1
    finally:
        clean.shutdown()
        e.shutdown()
