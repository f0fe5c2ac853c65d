"""I2 and I4 over the checkpoint tree, with the real engine and its real step functions: random commits (with and
without a conversation id), forks from earlier states, deletes, evictions to the host tier and back, on a pool
far too small. After every operation the ledger's references equal what holds them (I4), every checkpoint's
KV positions and Mamba state are what they were when it was committed (I2, across host round trips too), and
every answer equals a recompute-everything engine's."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from hybrid_jax import ledger as L
from serving import Engine
from serving.errors import ConversationExpired


def _contents(engine, cid):
    """(k, v, conv, ssm) of a device checkpoint: the KV positions it covers and its Mamba slot."""
    t = engine.ledger.turns[cid]
    c = engine.cache
    k = np.asarray(c.kv.k[:, list(t.blocks)]).reshape(c.kv.k.shape[0], -1, *c.kv.k.shape[3:])[:, :t.length]
    v = np.asarray(c.kv.v[:, list(t.blocks)]).reshape(c.kv.v.shape[0], -1, *c.kv.v.shape[3:])[:, :t.length]
    return k, v, np.asarray(c.mamba.conv[:, t.slot]), np.asarray(c.mamba.ssm[:, t.slot])


def _check(engine, seen: dict):
    def on_loop():
        L.check(engine.ledger)
        for cid in engine.ledger.turns:
            now = _contents(engine, cid)
            if cid in seen:
                for a, b in zip(seen[cid], now):
                    np.testing.assert_array_equal(a, b)
            else:
                seen[cid] = now
        # a checkpoint in the host tier keeps its committed contents for when it comes back
        for cid in list(seen):
            if cid not in engine.ledger.turns and cid not in engine.caches.host:
                del seen[cid]
    engine._call(on_loop)


@pytest.mark.parametrize("seed", [0, 1])
def test_tree_invariants_under_random_operations(tiny_model_dir, seed):
    kw = dict(max_model_len=256, max_num_seqs=2, max_prefill_tokens=64)
    e = Engine.from_pretrained(tiny_model_dir, num_blocks=24, num_slots=6, host_cache_memory="8MiB", **kw)
    ref = Engine.from_pretrained(tiny_model_dir, cache_mode="none", **kw)
    rng = np.random.RandomState(seed)
    done: list[list[int]] = []          # full token sequences committed so far (prompt + answer)
    convs: dict[str, list[int]] = {}    # conversation id -> its committed tokens
    seen: dict = {}
    try:
        for _ in range(40):
            op = rng.choice(["anon", "fork", "conv", "delete"], p=[0.3, 0.3, 0.3, 0.1])
            new = rng.randint(0, 256, rng.randint(1, 30)).tolist()
            if op == "delete" and convs:
                cid = sorted(convs)[rng.randint(len(convs))]
                assert e.delete_conversation(cid, "s")
                del convs[cid]
                _check(e, seen)
                continue
            if op == "conv" or op == "delete":
                cid = f"c{rng.randint(3)}"
                if len(convs.get(cid, [])) > 180:  # near max_model_len: start it over
                    assert e.delete_conversation(cid, "s")
                    del convs[cid]
                full = convs.get(cid, []) + new
                r = e.complete(new, conversation_id=cid, cache_salt="s", max_tokens=8, temperature=0)
                assert r.cached_tokens <= len(convs.get(cid, []))
            else:
                base = done[rng.randint(len(done))] if done and op == "fork" else []
                cut = len(base) if rng.rand() < 0.5 else rng.randint(len(base) + 1)  # often a whole old turn
                full = base[:cut] + new
                r = e.complete(full, cache_salt="s", max_tokens=8, temperature=0)
            want = ref.complete(full, max_tokens=8, temperature=0)
            assert r.token_ids == want.token_ids
            if op in ("conv", "delete"):
                convs[cid] = full + r.token_ids
            done.append(full + r.token_ids)
            _check(e, seen)
        stats = e.stats()
        assert stats["evictions"] > 0 and stats["hits"] > 0 and stats["offloads"] > 0, stats
        assert stats["host_restores"] > 0, stats
    finally:
        e.shutdown()
        ref.shutdown()


def test_heads_outlive_anonymous_and_intermediate_checkpoints(tiny_model_dir):
    e = Engine.from_pretrained(tiny_model_dir, max_model_len=256, max_num_seqs=2, num_slots=6,
                               host_cache_memory=0)
    try:
        rng = np.random.RandomState(5)
        named = e.complete(rng.randint(0, 256, 20).tolist(), conversation_id="keep", cache_salt="s", max_tokens=4,
                           temperature=0)
        for _ in range(12):  # anonymous traffic that needs the slots over and over
            e.complete(rng.randint(0, 256, 20).tolist(), cache_salt="s", max_tokens=4, temperature=0)
        assert e.stats()["evictions"] >= 8
        nxt = e.complete([7, 8, 9], conversation_id="keep", cache_salt="s", max_tokens=4, temperature=0)
        assert nxt.cached_tokens == named.prompt_tokens + named.completion_tokens - 1
    finally:
        e.shutdown()


def test_delete_is_atomic_with_respect_to_new_turns(tiny_model_dir):
    """The interleaving that once attached a deleted state: a DELETE queued behind the loop while a new turn of
    the same conversation arrives. The delete and the device drop are one step of the loop, so the turn either
    leased the conversation first (the delete is refused: 409) or starts a new conversation with nothing
    attached."""
    import threading

    from serving.errors import ConversationBusy
    e = Engine.from_pretrained(tiny_model_dir, max_model_len=256)
    try:
        first = e.complete([1, 2, 3, 4, 5], conversation_id="x", cache_salt="del", max_tokens=4, temperature=0)
        gate, started = threading.Event(), threading.Event()
        blocker = threading.Thread(target=lambda: e._call(lambda: (started.set(), gate.wait(30))))
        blocker.start()
        started.wait(30)  # the loop is held: everything below queues behind it
        outcome = {}

        def delete():
            try:
                outcome["deleted"] = e.delete_conversation("x", "del")
            except ConversationBusy:
                outcome["deleted"] = "busy"
        deleter = threading.Thread(target=delete)
        deleter.start()
        turn = e.complete_stream([6, 7], conversation_id="x", cache_salt="del", max_tokens=4, temperature=0)
        gate.set()
        blocker.join()
        deleter.join()
        r = turn.result(timeout=60)
        assert outcome["deleted"] == "busy"  # the turn holds the lease: the delete waits for no one, it refuses
        assert r.cached_tokens == first.prompt_tokens + first.completion_tokens - 1
        assert e.delete_conversation("x", "del") is True
        again = e.complete([6, 7], conversation_id="x", cache_salt="del", max_tokens=4, temperature=0)
        assert again.cached_tokens == 0 and again.prompt_tokens == 2
    finally:
        e.shutdown()


def test_idle_conversations_and_checkpoints_expire(tiny_model_dir):
    import time
    e = Engine.from_pretrained(tiny_model_dir, max_model_len=256, conversation_ttl=0.6, max_conversations=3)
    try:
        for i in range(6):
            e.complete([i + 1, 2, 3], conversation_id=f"c{i}", cache_salt="ttl", max_tokens=3, temperature=0)
        e.complete([9, 9, 9], cache_salt="ttl", max_tokens=3, temperature=0)  # an anonymous checkpoint
        time.sleep(0.35)
        assert len(e.conversations.items()) <= 3  # the bound, before any time-to-live passed
        time.sleep(1.0)
        assert e.conversations.items() == [] and e.stats()["checkpoints"] == 0
        with pytest.raises(ConversationExpired, match="conversation-ttl"):  # a tombstone says why it is gone
            e.get_conversation("c5", "ttl")
        assert e.stats()["conversations_expired"] == 6
        L.check(e.ledger)
    finally:
        e.shutdown()
