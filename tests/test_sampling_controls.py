"""Engine-level sampling controls: grammar masks, biases and penalties ride in the compiled steps without new
programs after warm-up; n choices fork one prefill; generation_config.json gives the defaults."""
from __future__ import annotations

import json

import numpy as np
import pytest

from serving.adjust import token_bits
from serving.engine import Engine
from serving.grammar import GrammarSpec

MSGS = [{"role": "user", "content": "Tell me about the sea, please."}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = Engine.from_pretrained(tiny_model_dir, max_model_len=512, max_num_seqs=4)
    e.warmup(progress=False)
    yield e
    e.shutdown()


def _programs(e) -> int:
    """Step programs compiled: by the engine (one per shape it dispatched) or by jit."""
    return e.runner.programs.ready() + e.runner._prefill._cache_size() + e.runner._decode._cache_size()


def test_controls_compile_nothing_after_warmup(engine):
    before = _programs(engine)
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}},
                                    "required": ["a"]})
    handles = [engine.chat_stream(MSGS, temperature=1.0, seed=1, max_tokens=40, grammar=spec),
               engine.chat_stream(MSGS, temperature=0, max_tokens=20, frequency_penalty=1.5, ignore_eos=True),
               engine.chat_stream(MSGS, temperature=0, max_tokens=20, repetition_penalty=1.7, ignore_eos=True),
               engine.chat_stream(MSGS, temperature=0, max_tokens=20, logit_bias={7: 5.0}, min_tokens=5)]
    results = [h.result(timeout=300) for h in handles]
    assert all(r.finish_reason in ("stop", "length") for r in results), [r.error for r in results]
    assert json.loads(results[0].text)["a"] <= 99
    assert _programs(engine) == before


def test_grammar_row_and_plain_rows_share_steps(engine):
    """A constrained request next to plain ones: the plain ones give what they give alone."""
    alone = engine.chat(MSGS, temperature=0, max_tokens=24, ignore_eos=True)
    spec = GrammarSpec.regex("[a-c]{30}")
    h = engine.chat_stream(MSGS, temperature=1.0, seed=3, max_tokens=64, grammar=spec)
    plain = [engine.chat_stream(MSGS, temperature=0, max_tokens=24, ignore_eos=True) for _ in range(2)]
    assert all(p.result(timeout=300).token_ids == alone.token_ids for p in plain)
    r = h.result(timeout=300)
    assert len(r.text) == 30 and set(r.text) <= set("abc") and r.finish_reason == "stop"


def test_min_tokens_and_logit_bias(engine):
    end = engine.tokenizer.eos_token_ids[0]
    assert engine.chat(MSGS, temperature=0, max_tokens=20, logit_bias={end: 100}).completion_tokens == 1
    r = engine.chat(MSGS, temperature=0, max_tokens=20, logit_bias={end: 100}, min_tokens=4)
    assert r.completion_tokens == 5 and r.finish_reason == "stop"


def test_penalties_match_a_host_reference(engine):
    """Greedy with a frequency penalty: each token is the argmax of the raw logits less the penalty times its
    count so far (checked against the logprobs the engine reports, which are the raw model's)."""
    r = engine.chat(MSGS, temperature=0, max_tokens=24, frequency_penalty=1.0, presence_penalty=0.5,
                    ignore_eos=True, logprobs=True, top_logprobs=5)
    counts: dict[int, int] = {}
    assert any(t != lp.top[0][0] for t, lp in zip(r.token_ids, r.logprobs))  # the penalties changed choices
    for t, lp in zip(r.token_ids, r.logprobs):
        # among the top-5 raw alternatives, the chosen one has the best penalised score
        scored = {a: lg - (0.5 + counts[a] * 1.0 if a in counts else 0.0) for a, _, lg in lp.top}
        best = max(scored, key=scored.get)
        if t in scored:
            assert scored[t] >= scored[best] - 1e-4
        counts[t] = counts.get(t, 0) + 1


def test_n_choices_one_prefill(engine):
    s0 = engine.stats()
    hs = engine.chat_streams(MSGS, 4, cache_salt="fork-4", temperature=1.0, seed=5, max_tokens=12)
    rs = [h.result(timeout=300) for h in hs]
    s1 = engine.stats()
    L = rs[0].prompt_tokens
    computed = (s1["prompt_tokens"] - s0["prompt_tokens"]) - (s1["cached_prompt_tokens"] - s0["cached_prompt_tokens"])
    assert computed == L + 3
    assert [r.cached_tokens for r in rs] == [0, L - 1, L - 1, L - 1]
    again = engine.chat_streams(MSGS, 4, cache_salt="fork-4b", temperature=1.0, seed=5, max_tokens=12)
    assert [h.result(timeout=300).token_ids for h in again] == [r.token_ids for r in rs]


def test_generation_config_defaults(tiny_model_dir, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 7,
                                                                 "bos_token_id": 1}))
    e = Engine.from_pretrained(tiny_model_dir, max_model_len=512, generation_config=str(tmp_path))
    try:
        assert e.sampling_defaults == {"temperature": 0.0, "max_tokens": 7}
        a, b = (e.chat(MSGS, ignore_eos=True) for _ in range(2))
        assert a.completion_tokens == 7 and a.token_ids == b.token_ids  # greedy, 7 tokens
        assert e.chat(MSGS, ignore_eos=True, max_tokens=3).completion_tokens == 3  # the request wins
    finally:
        e.shutdown()


def test_token_bits():
    w = token_bits([0, 31, 32, 263], 264)
    assert w.shape == (9,) and w.dtype == np.int32
    bits = np.unpackbits(w.view(np.uint8), bitorder="little")
    assert list(np.flatnonzero(bits)) == [0, 31, 32, 263]
