"""A model and its cache as shapes only (`jax.ShapeDtypeStruct`, with their tensor parallel shardings): what a
program is lowered from when no weights are in memory, e.g. for a platform that is not present
(tests/test_cross_lowering.py). Nothing here allocates an array.

`abstract_model` gives exactly the stacked parameters `loader.load_pretrained(..., stacked=True)` returns for the
checkpoint the writer plans for a config (checkpoint_writer/plan.py: the tensors a released checkpoint stores),
moved to the tensor parallel layout `sharding.shard_model` gives; `abstract_cache` the pools `cache.init_cache`
makes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.cache import cache_specs, init_cache
from hybrid_jax.checkpoint_writer.plan import plan_checkpoint
from hybrid_jax.config import ModelConfig, from_hf
from hybrid_jax.loader import FLOAT32_PARAMS, OPTIONAL_PARAMS, expected_shapes, resolve_dtype, sublayer_sources
from hybrid_jax.mesh import named, param_specs
from hybrid_jax.sharding import tp_config
from hybrid_jax.stack import KINDS


def _present(cfg: ModelConfig, keys: set, pre: str) -> list[set]:
    """Per sublayer, our names of the parameters a checkpoint with tensors `keys` gives (as the loader reads)."""
    out = []
    for names in sublayer_sources(cfg, pre):
        have = set()
        for ours, theirs in names.items():
            if ours == "gate_up":
                have |= {"gate", "up"}
            elif not (ours in OPTIONAL_PARAMS and theirs not in keys):
                have.add(ours)
        out.append(have)
    return out


def abstract_model(config: dict, dtype="auto", tp: int = 1) -> tuple[ModelConfig, dict]:
    """(cfg in the tp layout, its stacked params as ShapeDtypeStructs) for a config.json dict. dtype: as the
    loader's (`resolve_dtype`; A_log, D, dt_bias and the router bias float32). With tp > 1 each struct carries its
    NamedSharding over `mesh.mesh_for(tp)` (tp devices must exist, of any platform); at tp 1 none."""
    cfg = from_hf(config)
    dt = resolve_dtype(cfg, dtype)
    tcfg = tp_config(cfg, tp)
    keys = {s.name for s in plan_checkpoint(config)}
    pre = "backbone." if cfg.family == "nemotron_h" else "model."

    def struct(name, shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32 if name in FLOAT32_PARAMS else dt)

    V, D = cfg.vocab_size, cfg.hidden_size
    params = {"embed": struct("embed", (V, D)), "final_norm": struct("final_norm", (D,))}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = struct("lm_head", (V, D))
    present = _present(cfg, keys, pre)
    params["stack"] = {}
    for kind in KINDS:
        group = [names for k, names in zip(cfg.sublayers, present) if k == kind]
        if group:
            shapes = expected_shapes(tcfg, kind)  # the tp layout's widths (shard-major, duplicated heads)
            params["stack"][kind] = {n: struct(n, (len(group),) + shapes[n]) for n in sorted(set().union(*group))}
    if tp > 1:
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params,
                              named(param_specs(params, tcfg), tp))
    return tcfg, params


def abstract_cache(cfg: ModelConfig, *, num_blocks: int, block_size: int, num_slots: int, dtype=jnp.bfloat16):
    """The Cache of `init_cache(cfg, ...)` as ShapeDtypeStructs (sharded over the mesh when cfg.tp > 1)."""
    shapes = jax.eval_shape(functools.partial(init_cache, cfg, num_blocks=num_blocks, block_size=block_size,
                                              num_slots=num_slots, dtype=dtype))
    if cfg.tp == 1:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        named(cache_specs(cfg), cfg.tp))
