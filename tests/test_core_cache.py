"""Invariant I1 at the core: a prompt prefilled in awkward pieces and decoded equals the uncached forward."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import hybrid_jax
from hybrid_jax.generate import SingleSequence


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return hybrid_jax.load_pretrained(tiny_model_dir)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("block_size", [16, 5])
def test_piecewise_prefill_then_decode_matches_forward(model, block_size):
    cfg, params = model
    rng = np.random.RandomState(1)
    n = 1 + 7 + 63 + 100
    toks = rng.randint(0, cfg.vocab_size, n).tolist()
    seq = SingleSequence(params, cfg, n + 16, block_size=block_size)
    pieces, at = [], 0
    for size in (1, 7, 63, 100):  # not multiples of the block size or of the chunk size (16)
        pieces.append(np.asarray(seq.extend(toks[at:at + size], all_logits=True)))
        at += size
    ref = np.asarray(hybrid_jax.forward(params, cfg, np.array([toks])))[0]
    assert _rel(np.concatenate(pieces), ref) <= 1e-4
    # decode 8 greedy tokens from the cache and compare with the uncached forward of the whole sequence
    logits, full = pieces[-1][-1], list(toks)
    for _ in range(8):
        tok = int(np.argmax(logits))
        full.append(tok)
        logits = np.asarray(seq.step(tok))
    ref = np.asarray(hybrid_jax.forward(params, cfg, np.array([full])))[0, -1]
    assert _rel(logits, ref) <= 1e-4


def test_no_recompilation_after_warmup(model):
    """The same buckets again compile nothing: lengths vary inside a bucket, shapes do not."""
    cfg, params = model
    rng = np.random.RandomState(2)

    def workload():
        for size in (3, 9, 16):  # all inside the 16-token prefill bucket
            seq = SingleSequence(params, cfg, 64, block_size=16)
            seq.extend(rng.randint(0, cfg.vocab_size, size).tolist())
            for _ in range(3):
                seq.step(int(rng.randint(cfg.vocab_size)))

    workload()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    workload()
    assert compiles == [], f"recompiled after warm-up: {compiles}"
