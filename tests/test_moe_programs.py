"""A mixture-of-experts model's step programs copy no cache pool (the MoE branch touches no cache) and never
hold one layer's whole expert weights as a value (slicing a layer's experts out of the stack copies all of them, a
cost that grows with the number of experts: the expert compute must read only the chosen experts' weights), and
the grouped matmul of the expert compute equals jax.lax.ragged_dot on ragged, empty and single-row groups.

(*) The model has two Mamba units: a model with a single Mamba layer (one scan iteration) copies the KV pools
whatever its other layers are - "M-*-" as much as "ME*E" - a property of the stack's one-trip scan, not of MoE.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_oracle as H
import hybrid_jax
from hybrid_jax.model import SpanBatch, make_steps
from hybrid_jax.stack import stack_layers
from pallas_kernels.grouped_matmul import grouped_matmul, max_tiles
from test_engine_scale import _cache, _pool_copies


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("moe_programs"))
    H.make_tiny_checkpoint("nemotron_h", path, "EM*EM", moe_latent_size=24, n_group=2)  # 2 Mamba units (*)
    cfg, params = hybrid_jax.load_pretrained(path)
    return cfg, stack_layers(params, cfg)


def test_moe_step_programs_copy_no_pool_nor_a_layers_experts(moe_model):
    cfg, params = moe_model
    cache = _cache(cfg)
    prefill, _, decode = make_steps(cfg)
    i32 = lambda *s: jnp.ones(s, jnp.int32)
    layer_experts = {",".join(map(str, a.shape[1:])) for n, a in params["stack"]["moe"].items()
                     if n.startswith("experts_")}  # "8,24,32", "8,32,24"
    for fn, T in ((decode, 1), (prefill, 16)):
        batch = SpanBatch(i32(2, T), i32(2), i32(2), i32(2), i32(2, 4))
        compiled = fn.lower(params, cache, batch).compile()
        assert _pool_copies(compiled, cache) == []
        whole = [line.strip()[:120] for line in compiled.as_text().splitlines()
                 if (m := re.search(r"= \w+\[([\d,]*)\]", line)) and m.group(1) in layer_experts]
        assert whole == [], whole


def test_grouped_matmul_reads_one_layer_of_a_stack():
    rng = np.random.default_rng(3)
    sizes = jnp.asarray([2, 0, 3], jnp.int32)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    w = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    f = jax.jit(lambda x, w, s, j: grouped_matmul(x, w, s, layer=j, impl="tiled"))
    for j in (0, 1):
        ref = jax.lax.ragged_dot(x, w[j], sizes, precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(np.asarray(f(x, w, sizes, j)), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, groups, tile", [(6, 128, None), (37, 5, 4), (64, 3, 16), (5, 2, 1), (1, 8, None)])
def test_grouped_matmul_equals_ragged_dot(rows, groups, tile):
    rng = np.random.default_rng(rows * groups)
    sizes = np.bincount(rng.integers(0, groups, rows), minlength=groups).astype(np.int32)
    x = rng.standard_normal((rows, 12)).astype(np.float32)
    w = rng.standard_normal((groups, 12, 7)).astype(np.float32)
    ref = jax.lax.ragged_dot(x, w, jnp.asarray(sizes), precision=jax.lax.Precision.HIGHEST)
    got = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl="tiled", tile_rows=tile))(x, w, jnp.asarray(sizes))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_tile_bound_covers_the_worst_case():
    """Every group non-empty and one row short of a full last tile: the static tile count still suffices."""
    for rows, groups, tile in [(6, 128, 8), (100, 10, 8), (1000, 64, 16), (7, 7, 1)]:
        sizes = np.full(min(groups, rows), 1)
        sizes[0] += rows - sizes.sum()
        needed = int(np.sum(-(-sizes // tile)))
        assert needed <= max_tiles(rows, groups, tile)
