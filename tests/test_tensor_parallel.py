"""Tensor parallelism over a jax Mesh of 4 host devices (tests/tp_checks.py, run in a subprocess because the
device count must be set before jax initialises): for a dense and a mixture-of-experts model, tensor parallel
sizes 1, 2 and 4 give the same forward logits (float tolerance) and the same 4-turn engine conversation (greedy
tokens, cache hits, logprobs), the parameters and the cache are really sharded (shapes on device 0 checked
against the rules of hybrid_jax/mesh.py), the cache keeps its sharding through the steps, and nothing compiles
after warm-up at tp 4."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_tiny_byte_model

HERE = os.path.dirname(os.path.abspath(__file__))
MOE = dict(layers=("mamba", "moe", "attention", "mamba", "moe"), n_routed_experts=8, num_experts_per_tok=2,
           moe_intermediate_size=32, moe_shared_expert_intermediate_size=48)


@pytest.fixture(scope="module", params=["dense", "moe"])
def run(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tp_{request.param}")
    model = write_tiny_byte_model(str(d / "model"), **(MOE if request.param == "moe" else {}))
    out = d / "tp.json"
    root = os.path.dirname(HERE)  # the checkout's packages, however (or whether) they are installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, os.path.join(HERE, "tp_checks.py"), model, str(out)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return request.param, {int(k): v for k, v in json.load(open(out)).items()}


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_forward_logits_agree_across_tp(run):
    _, res = run
    for tp in (2, 4):
        assert _rel(res[tp]["logits"], res[1]["logits"]) < 1e-5
        assert np.array_equal(np.argmax(res[tp]["logits"], -1), np.argmax(res[1]["logits"], -1))


def test_engine_conversation_agrees_across_tp(run):
    _, res = run
    ref = res[1]["turns"]
    assert [t["cached"] for t in ref][1:] == sorted([t["cached"] for t in ref][1:]) and ref[-1]["cached"] > 0
    for tp in (2, 4):
        turns = res[tp]["turns"]
        assert [t["tokens"] for t in turns] == [t["tokens"] for t in ref]
        assert [t["cached"] for t in turns] == [t["cached"] for t in ref]
        assert np.max(np.abs(np.concatenate([t["logprobs"] for t in turns]) -
                             np.concatenate([t["logprobs"] for t in ref]))) < 1e-4


# (param, sharded dimension counted from the end); everything else in the stack is replicated.
SHARDED = {"['stack']['mamba']['in_proj']": -1, "['stack']['mamba']['conv_w']": -2,
           "['stack']['mamba']['A_log']": -1, "['stack']['mamba']['norm_w']": -1,
           "['stack']['mamba']['out_proj']": -2, "['stack']['attention']['q']": -1,
           "['stack']['attention']['k']": -1, "['stack']['attention']['o']": -2, "['embed']": -2,
           "['lm_head']": -2}
DENSE = {"['stack']['mlp']['up']": -1, "['stack']['mlp']['down']": -2}
EXPERTS = {"['stack']['moe']['experts_up']": -1, "['stack']['moe']['experts_down']": -2,
           "['stack']['moe']['shared_up']": -1, "['stack']['moe']['shared_down']": -2}
REPLICATED = ["['final_norm']", "['stack']['mamba']['norm']", "['stack']['moe']['router']",
              "['stack']['moe']['router_bias']"]


def test_params_are_sharded(run):
    kind, res = run
    want = SHARDED | (EXPERTS if kind == "moe" else DENSE)
    for tp in (2, 4):
        params = {k[len("params"):]: v for k, v in res[tp]["params"].items()}
        for name, dim in want.items():
            full, shard, spec = params[name]
            expect = list(full)
            expect[dim] //= tp
            assert shard == expect and "'tp'" in spec, (tp, name, full, shard, spec)
        for name in REPLICATED:
            if name in params:
                assert params[name][1] == params[name][0], (tp, name)
    # tp 4 > 2 KV heads: each device holds one (duplicated) KV head; 2 B/C groups for 4 shards: one per shard
    assert res[4]["kv_heads"] == 4 and res[2]["kv_heads"] == 2
    assert res[4]["conv_dim"] == 128 + 2 * 4 * 16 and res[2]["conv_dim"] == res[1]["conv_dim"] == 128 + 2 * 2 * 16


def test_cache_is_sharded_and_stays_so(run):
    _, res = run
    axis = {"cache.kv.k": 3, "cache.kv.v": 3, "cache.mamba.conv": 2, "cache.mamba.ssm": 2}
    for tp in (2, 4):
        for when in ("cache_before", "cache_after"):
            for name, dim in axis.items():
                full, shard, _ = res[tp][when][name]
                expect = list(full)
                expect[dim] //= tp
                assert shard == expect, (tp, when, name, full, shard)
        assert res[tp]["cache_after"] == res[tp]["cache_before"]  # same sharding: same programs, donation in place
    # the memory plan counts one device's share
    assert res[2]["plan_bytes"] < res[1]["plan_bytes"]
    assert res[4]["compiles_after_warmup"] == []
