"""Model placement for tensor parallelism: the tp layout of a config and of its parameters, and placing them on
the mesh. Above the stack; the partition specs and the mesh are hybrid_jax/mesh.py, which also says what is
sharded by which dimension.

The Mamba in_proj columns and conv channels are reordered shard-major (each of tp blocks holds its heads' z, x,
B, C, dt), B/C groups read by several shards are repeated in each, and KV heads fewer than tp are duplicated, so
that a contiguous split over the mesh is a split by heads.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ConfigError, ModelConfig
from hybrid_jax.mesh import mesh_for, named, param_specs
from hybrid_jax.stack import stack_layers


def tp_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """cfg in the tensor parallel layout of tp devices (raises ConfigError when a dimension does not split)."""
    if cfg.tp != 1:
        raise ConfigError("tp_config takes a config in the checkpoint's layout (tp 1)")
    if tp == 1:
        return cfg
    bad = []
    need = {"num_attention_heads": cfg.num_heads, "mamba heads": cfg.mamba_heads,
            "intermediate_size": cfg.intermediate_size if "mlp" in cfg.sublayers else 0}
    if cfg.moe is not None:
        need |= {"expert intermediate size": cfg.moe.intermediate_size,
                 "shared expert intermediate size": cfg.moe.shared_intermediate_size}
    bad += [f"{k}={v}" for k, v in need.items() if v % tp]
    K, G = cfg.num_kv_heads, cfg.mamba_groups
    if "attention" in cfg.sublayers and K % tp and tp % K:
        bad.append(f"num_key_value_heads={K} (neither divides the other)")
    if "mamba" in cfg.sublayers and G % tp and tp % G:
        bad.append(f"mamba groups={G} (neither divides the other)")
    if bad:
        raise ConfigError(f"tensor_parallel_size={tp} does not split {', '.join(bad)}")
    return dataclasses.replace(cfg, tp=tp, num_kv_heads=max(K, tp) if "attention" in cfg.sublayers else K)


def _mamba_index(cfg: ModelConfig, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays into the checkpoint layout's in_proj columns and conv channels giving the shard-major
    layout of tp shards (a group read by several shards is repeated in each)."""
    inner, N, H, G = cfg.mamba_inner, cfg.d_state, cfg.mamba_heads, cfg.mamba_groups
    r = np.arange

    def groups(s):  # the original groups shard s holds
        return r(s * G // tp, (s + 1) * G // tp) if G % tp == 0 else np.array([s * G // tp])

    def cols(base, gs):
        return np.concatenate([base + r(g * N, (g + 1) * N) for g in gs])

    i, h = inner // tp, H // tp
    proj, conv = [], []
    for s in range(tp):
        x, gs = r(s * i, (s + 1) * i), groups(s)
        xbc = [x, cols(inner, gs), cols(inner + G * N, gs)]
        conv += xbc
        proj += [x, *[a + inner for a in xbc], 2 * inner + 2 * G * N + r(s * h, (s + 1) * h)]
    return np.concatenate(proj), np.concatenate(conv)


def _kv_index(cfg: ModelConfig, tp: int) -> np.ndarray:
    """Columns of k/v giving max(K, tp) heads, head s of the duplicated layout being original head s // (tp / K)."""
    K, D = cfg.num_kv_heads, cfg.head_dim
    if K >= tp:
        return np.arange(K * D)
    rep = tp // K
    return np.concatenate([np.arange((s // rep) * D, (s // rep + 1) * D) for s in range(tp)])


def tp_params(params: dict, cfg: ModelConfig, tp: int) -> dict:
    """Stacked params of cfg (checkpoint layout, numpy or jax) -> the tp layout of tp_config(cfg, tp), as numpy
    on the host (nothing reaches a device here)."""
    stack = {kind: dict(group) for kind, group in params["stack"].items()}
    if tp > 1 and "mamba" in stack:
        proj, conv = _mamba_index(cfg, tp)
        m = stack["mamba"]
        for name, idx, axis in (("in_proj", proj, -1), ("in_proj_b", proj, -1), ("conv_w", conv, -2),
                                ("conv_b", conv, -1)):
            if name in m:
                m[name] = np.take(np.asarray(m[name]), idx, axis=axis)
    if tp > cfg.num_kv_heads and "attention" in stack:
        idx = _kv_index(cfg, tp)
        a = stack["attention"]
        for name in ("k", "v", "k_b", "v_b"):
            if name in a:
                a[name] = np.take(np.asarray(a[name]), idx, axis=-1)
    out = {k: v for k, v in params.items() if k != "stack"}
    out["stack"] = stack
    return jax.tree.map(np.asarray, out)


def shard_model(cfg: ModelConfig, params: dict, tp: int) -> tuple[ModelConfig, dict]:
    """(tp_config(cfg, tp), params in that layout placed on mesh_for(tp)). params: stacked or list form, in the
    checkpoint layout, numpy or jax. tp == 1 returns them unchanged."""
    if tp == 1:
        return cfg, params
    tcfg = tp_config(cfg, tp)
    host = tp_params(stack_layers(params, cfg, xp=np), cfg, tp)
    return tcfg, jax.device_put(host, named(param_specs(host, tcfg), tp))


def replicated_sharding(cfg: ModelConfig):
    """Where a step's small inputs that come back from a step (sampled tokens) live: replicated over the mesh
    (None, the default device, at tp 1). Placing them there up front keeps one program per step shape."""
    return None if cfg.tp == 1 else NamedSharding(mesh_for(cfg.tp), P())
