"""hybrid_jax.memory.plan_cache: one memory budget for KV blocks and Mamba state slots, planned without
allocating anything, for every real model config in configs/models/."""
from __future__ import annotations

import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import pytest

from hybrid_jax.cache import init_cache
from hybrid_jax.config import from_hf
from hybrid_jax.memory import (CACHED_CONVERSATIONS_PER_SEQ, CachePlan, CachePlanError, device_memory_bytes,
                               format_bytes, param_bytes, parse_bytes, plan_cache)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "models", "*.json")))
GiB = 1024 ** 3
NANO = os.path.join(ROOT, "configs", "models", "nvidia-nemotron-nano-9b-v2.json")

TINY = {
    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": 40, "hidden_size": 16,
    "hybrid_override_pattern": "M-*M-", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
    "intermediate_size": 24, "mlp_hidden_act": "relu2", "mamba_num_heads": 4, "mamba_head_dim": 4, "n_groups": 2,
    "ssm_state_size": 8, "conv_kernel": 4, "chunk_size": 8,
}


def _cfg(path):
    with open(path) as f:
        return from_hf(json.load(f))


def _blocks_for(n, bs):
    return -(-n // bs)


def test_configs_present():
    assert len(CONFIGS) >= 4 and NANO in CONFIGS


@pytest.mark.parametrize("slots_per_seq", [1, 2], ids=["exact", "align"])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-5])
def test_every_config_fits_40gib_at_32k(path, slots_per_seq):
    cfg = _cfg(path)
    plan = plan_cache(cfg, dtype=jnp.bfloat16, block_size=16, max_model_len=32768, max_num_seqs=8,
                      slots_per_seq=slots_per_seq, kv_memory="40GiB")
    assert plan.total_bytes <= 40 * GiB
    assert plan.total_bytes == plan.num_blocks * plan.block_bytes + plan.num_slots * plan.slot_bytes
    assert plan.num_blocks - 1 >= _blocks_for(32768, 16)     # one full-length sequence, scratch excluded
    assert plan.tokens >= 32768
    assert plan.num_slots - 1 >= slots_per_seq * 8            # the running requests' slots, scratch excluded
    # Nothing worth a block is left over: the rest of the budget went to blocks.
    assert 40 * GiB - plan.total_bytes < plan.block_bytes
    assert plan.budget == 40 * GiB


def test_nano_9b_32k_40gib_plans_at_most_40gib():
    cfg = _cfg(NANO)
    plan = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8,
                      kv_memory=40 * GiB)
    assert plan.total_bytes <= 40 * GiB
    # The real per-slot and per-block sizes (issue 9: ~143 MB a slot, ~0.26 MB a 16-token bf16 block).
    assert 140e6 < plan.slot_bytes < 146e6
    assert plan.block_bytes == 2 * 4 * 16 * 8 * 128 * 2
    assert plan.num_slots == 8 + CACHED_CONVERSATIONS_PER_SEQ * 8 + 1
    assert plan.num_blocks - 1 >= 2048
    line = plan.describe()
    for part in (f"{plan.num_blocks:,}", f"{plan.tokens:,}", f"{plan.num_slots:,}", "GiB", "total"):
        assert part in line


def test_slots_never_take_more_than_half_the_budget_by_default():
    cfg = _cfg(NANO)
    # 8 GiB: 4 GiB of slots is 29 of 143 MB, fewer than the 41 of the default target but more than the minimum.
    plan = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8, kv_memory="8GiB")
    assert plan.num_slots == (4 * GiB) // plan.slot_bytes
    assert plan.state_bytes <= 4 * GiB and plan.total_bytes <= 8 * GiB
    # 2 GiB: half the budget holds fewer slots than the running requests need; the minimum wins.
    plan = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=8192, max_num_seqs=8, kv_memory="2GiB")
    assert plan.num_slots == 9 and plan.total_bytes <= 2 * GiB and plan.num_blocks - 1 >= 512


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-5])
def test_default_sizing_without_budget(path):
    cfg = _cfg(path)
    for sps in (1, 2):
        plan = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=2048, max_num_seqs=8,
                          slots_per_seq=sps)
        assert plan.num_blocks == 2 * 8 * 128 + 1
        assert plan.num_slots == sps * 8 + 8 + 1
        assert plan.budget is None
        assert "no memory budget" in plan.describe()


def test_budget_too_small_names_the_flag():
    cfg = _cfg(NANO)
    with pytest.raises(CachePlanError, match="--kv-memory") as e:
        plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8, kv_memory="1GiB")
    assert "--max-model-len" in str(e.value) and "--max-num-seqs" in str(e.value)
    # The minimum exactly: one full sequence plus the running slots, each with its scratch.
    plan = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8,
                      kv_memory=1 * GiB * 4)
    need = (2048 + 1) * plan.block_bytes + 9 * plan.slot_bytes
    ok = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8, kv_memory=need)
    assert (ok.num_blocks, ok.num_slots, ok.total_bytes) == (2049, 9, need)
    with pytest.raises(CachePlanError, match="--kv-memory"):
        plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8, kv_memory=need - 1)
    with pytest.raises(CachePlanError, match="--gpu-memory-utilization"):
        plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8,
                   gpu_memory_utilization=0.9, device_memory=20 * GiB, weight_bytes=17 * GiB)


def test_gpu_memory_utilization_budget():
    cfg = _cfg(NANO)
    dev, weights = 80 * GiB, 17 * GiB
    plan = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8,
                      gpu_memory_utilization=0.9, device_memory=dev, weight_bytes=weights)
    budget = int(0.9 * dev) - weights
    assert plan.budget == budget
    assert plan.total_bytes <= budget and budget - plan.total_bytes < plan.block_bytes
    assert plan.total_bytes + weights <= 0.9 * dev
    # kv_memory wins over the fraction.
    plan2 = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8,
                       kv_memory="10GiB", gpu_memory_utilization=0.9, device_memory=dev, weight_bytes=weights)
    assert plan2.budget == 10 * GiB
    with pytest.raises(CachePlanError, match="--gpu-memory-utilization"):
        plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8,
                   gpu_memory_utilization=1.5, device_memory=dev)


def test_gpu_memory_utilization_without_device_memory_is_ignored(caplog):
    cfg = _cfg(NANO)
    with caplog.at_level(logging.WARNING, logger="hybrid_jax.memory"):
        plan = plan_cache(cfg, dtype="bfloat16", block_size=16, max_model_len=2048, max_num_seqs=4,
                          gpu_memory_utilization=0.9, device_memory=None)
    assert plan.budget is None and plan.num_blocks == 2 * 4 * 128 + 1
    assert "ignored" in caplog.text


def test_explicit_num_slots_and_num_blocks():
    cfg = _cfg(NANO)
    kw = dict(dtype="bfloat16", block_size=16, max_model_len=32768, max_num_seqs=8, kv_memory="40GiB")
    plan = plan_cache(cfg, num_slots=100, **kw)
    assert plan.num_slots == 100 and plan.total_bytes <= 40 * GiB
    assert 40 * GiB - plan.total_bytes < plan.block_bytes
    plan = plan_cache(cfg, num_blocks=5000, **kw)
    assert plan.num_blocks == 5000 and plan.num_slots == 41
    plan = plan_cache(cfg, num_blocks=5000, num_slots=20, **kw)
    assert (plan.num_blocks, plan.num_slots) == (5000, 20)
    # With most of the budget in blocks, the default slots get what is left (never below the minimum).
    nb = (40 * GiB - 20 * plan.slot_bytes) // plan.block_bytes
    plan = plan_cache(cfg, num_blocks=nb, **kw)
    assert plan.num_slots == 20 and plan.total_bytes <= 40 * GiB
    # Refused: below the minimum or past the budget, naming the flag.
    with pytest.raises(CachePlanError, match="--num-slots"):
        plan_cache(cfg, num_slots=8, **kw)           # 8 running requests + scratch need 9
    with pytest.raises(CachePlanError, match="--num-slots"):
        plan_cache(cfg, num_slots=16, slots_per_seq=2, **{**kw, "kv_memory": "80GiB"})  # align: 17
    with pytest.raises(CachePlanError, match="--num-slots"):
        plan_cache(cfg, num_slots=400, **kw)         # 400 x 143 MB > 40 GiB
    with pytest.raises(CachePlanError, match="--num-blocks"):
        plan_cache(cfg, num_blocks=2048, **kw)       # one 32K sequence needs 2048 + scratch
    with pytest.raises(CachePlanError, match="--num-blocks"):
        plan_cache(cfg, num_blocks=200_000, **kw)    # 200,000 x 256 KiB > 40 GiB
    with pytest.raises(CachePlanError, match="--num-blocks"):
        plan_cache(cfg, num_blocks=150_000, num_slots=41, **kw)
    # Without a budget explicit counts are taken as given, minimums still apply.
    nobudget = {k: v for k, v in kw.items() if k != "kv_memory"}
    plan = plan_cache(cfg, num_blocks=3000, num_slots=12, **nobudget)
    assert (plan.num_blocks, plan.num_slots, plan.budget) == (3000, 12, None)
    with pytest.raises(CachePlanError, match="--num-slots"):
        plan_cache(cfg, num_slots=3, **nobudget)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pattern", ["M-*M-", "M-M-"], ids=["hybrid", "no-attention"])
def test_total_bytes_is_what_init_cache_allocates(dtype, pattern):
    cfg = from_hf({**TINY, "hybrid_override_pattern": pattern})
    plan = plan_cache(cfg, dtype=dtype, block_size=8, max_model_len=64, max_num_seqs=2, kv_memory="300KiB")
    cache = init_cache(cfg, num_blocks=plan.num_blocks, block_size=plan.block_size, num_slots=plan.num_slots,
                       dtype=dtype)
    allocated = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    assert allocated == plan.total_bytes <= 300 * 1024
    kv = cache.kv.k.nbytes + cache.kv.v.nbytes
    assert kv == plan.kv_bytes and allocated - kv == plan.state_bytes
    assert cache.mamba.ssm.dtype == jnp.float32 and cache.mamba.conv.dtype == dtype


def test_parse_bytes():
    assert parse_bytes(None) is None
    assert parse_bytes(1000) == 1000
    assert parse_bytes("1000000") == 1000000
    assert parse_bytes("512MiB") == 512 * 1024 ** 2
    assert parse_bytes("2GiB") == 2 * GiB
    assert parse_bytes("40GiB") == 40 * GiB
    assert parse_bytes("1.5GB") == int(1.5 * GiB)
    assert parse_bytes("64 KiB") == 64 * 1024
    assert parse_bytes("3g") == 3 * GiB
    for bad in ("lots", "1.2.3GiB", "12 PB", ""):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(12.3 * GiB) == "12.3 GiB"


def test_param_bytes_and_device_memory():
    params = {"a": jnp.zeros((3, 4), jnp.bfloat16), "b": [jnp.zeros(5, jnp.float32)]}
    assert param_bytes(params) == 3 * 4 * 2 + 5 * 4
    if jax.devices()[0].platform == "cpu":
        assert device_memory_bytes() is None
    else:
        assert device_memory_bytes() > 0

    class Fake:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 80 * GiB, "bytes_in_use": 0}

    class NoStats:
        platform = "tpu"

        def memory_stats(self):
            return None

    assert device_memory_bytes(Fake()) == 80 * GiB
    assert device_memory_bytes(NoStats()) is None


def test_plan_is_frozen():
    plan = CachePlan(num_blocks=3, num_slots=2, block_size=16, block_bytes=10, slot_bytes=7)
    assert (plan.kv_bytes, plan.state_bytes, plan.total_bytes, plan.tokens) == (30, 14, 44, 32)
    with pytest.raises(Exception):
        plan.num_blocks = 4
