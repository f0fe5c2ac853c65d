"""Start-up compiles only what a first request needs: the rest compile in a background thread while the engine
serves, a step whose program is not ready waits for that one compile, and no program compiles twice."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from serving import Engine

POOL = dict(max_model_len=512, max_num_seqs=4, max_prefill_tokens=64)


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, length).tolist() for _ in range(n)]


def _run(engine, prompts):
    handles = [engine.complete_stream(p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
    return [h.result(timeout=300).token_ids for h in handles]


@pytest.fixture
def cold_compilation_cache(tmp_path):
    """An empty persistent compilation cache for this test (as a first start has), then the suite's again."""
    was = jax.config.jax_compilation_cache_dir
    compilation_cache.set_cache_dir(str(tmp_path / "jax"))
    compilation_cache.reset_cache()
    jax.clear_caches()
    yield
    compilation_cache.set_cache_dir(was)
    compilation_cache.reset_cache()


def test_a_first_warmup_serves_at_once_and_compiles_each_program_once(tiny_model_dir, cold_compilation_cache,
                                                                       caplog):
    e = Engine.from_pretrained(tiny_model_dir, **POOL)
    full = Engine.from_pretrained(tiny_model_dir, **POOL)
    try:
        programs = e.runner.programs
        with caplog.at_level(logging.INFO, logger="serving.runner"):
            info = e.warmup(progress=False, first_only=True)
            first = e.runner.first_shapes()
            assert info["programs"] == len(first) < len(programs.shapes)
            assert {programs.compiled_by[s] for s in first} == {"warm-up"}
            # at once: four long prompts need the widest prefill and decode programs, the last the background
            # thread would reach
            prompts = _prompts(4, 200, 1)
            got = _run(e, prompts)
            assert programs.wait_background(timeout=600)
        full.warmup(progress=False)
        assert got == _run(full, prompts)
        assert programs.compiles == len(programs.shapes)  # each once, whoever compiled it
        assert programs.steps_waited >= 1
        by = set(programs.compiled_by.values())
        assert "background warm-up" in by and by <= {"warm-up", "background warm-up", "step"}
        said = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("a step waited") for m in said), said
        assert any(m.startswith(f"background warm-up: {len(programs.shapes) - len(first)} step programs ready")
                   for m in said), said
        # everything compiled: serving compiles nothing more
        before = programs.compiles
        _run(e, _prompts(3, 90, 2))
        assert programs.compiles == before
    finally:
        full.shutdown()
        e.shutdown()


def test_shapes_by_likelihood_start_with_the_first_request(tiny_model_dir):
    e = Engine.from_pretrained(tiny_model_dir, **POOL)
    try:
        r = e.runner
        order = r.by_likelihood()
        assert sorted(order) == sorted(r.shapes())
        assert set(order[:len(r.first_shapes())]) <= set(r.first_shapes()) | {
            s for s in order if s[1] == 1 or s[0] == "decode"}
        assert order[0][3] == order[1][3] == 4 and order[-1][3] == r.table_width
    finally:
        e.shutdown()
