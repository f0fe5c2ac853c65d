"""Tensor parallel checks, run in a subprocess by tests/test_tensor_parallel.py: XLA must see 4 host devices, which
can only be set before jax initialises (the pytest process has long initialised it with one).

    python tests/tp_checks.py MODEL_DIR OUT_JSON

For tensor parallel sizes 1, 2 and 4 it records the uncached forward's logits (2 x 24 tokens), a 4-turn greedy
chat conversation through the Engine (tokens, cached tokens, logprobs), and the shardings of the parameters and
of the cache (before and after the conversation) as {name: [global shape, shape on device 0, spec]}. At tp 4 the
engine is warmed up first and the programs compiled during the conversation are recorded (there must be none).
"""
from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import hybrid_jax  # noqa: E402
from hybrid_jax.sharding import shard_model  # noqa: E402
from serving import Engine  # noqa: E402

TURNS = ["Hi, I am Ada.", "My name?", "Again.", "Thanks"]


def _layout(a) -> list:
    shard = a.addressable_shards[0].data.shape
    return [list(a.shape), list(shard), str(a.sharding.spec) if hasattr(a.sharding, "spec") else "single-device"]


def _shardings(tree, prefix="") -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + jax.tree_util.keystr(path)] = _layout(leaf)
    return out


def main(model_dir: str, out_path: str) -> None:
    assert jax.device_count() == 4, jax.devices()
    cfg, params = hybrid_jax.load_pretrained(model_dir, dtype="float32", stacked=True, on_host=True)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
    result = {}
    for tp in (1, 2, 4):
        tcfg, tparams = shard_model(cfg, params if tp > 1 else jax.tree.map(jax.numpy.asarray, params), tp)
        with jax.default_matmul_precision("highest"):
            logits = np.asarray(hybrid_jax.forward(tparams, tcfg, tokens))
        # few step shapes: one prefill bucket (16 tokens), block tables of 4 or 8 blocks
        engine = Engine.from_pretrained(model_dir, dtype="float32", tensor_parallel_size=tp, block_size=16,
                                        max_model_len=128, max_num_seqs=2, max_prefill_tokens=16)
        compiles = []
        if tp == 4:
            engine.warmup(progress=False)
            jax.monitoring.register_event_duration_secs_listener(
                lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
        cache_before = _shardings(engine.cache, "cache")
        messages, turns = [], []
        with jax.default_matmul_precision("highest"):
            for text in TURNS:
                messages.append({"role": "user", "content": text})
                r = engine.chat(messages, conversation_id="tp", max_tokens=6, temperature=0, logprobs=True,
                                top_logprobs=2)
                assert r.error is None, r.error
                messages.append({"role": "assistant", "content": r.text})
                turns.append({"tokens": r.token_ids, "cached": r.cached_tokens,
                              "logprobs": [lp.logprob for lp in r.logprobs]})
        result[tp] = {"logits": logits.tolist(), "turns": turns, "params": _shardings(engine.params, "params"),
                      "cache_before": cache_before, "cache_after": _shardings(engine.cache, "cache"),
                      "kv_heads": engine.cfg.num_kv_heads, "conv_dim": engine.cfg.conv_dim,
                      "plan_bytes": engine.plan.total_bytes, "compiles_after_warmup": list(compiles)}
        engine.shutdown()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
