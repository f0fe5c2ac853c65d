"""Tensor parallelism: the rules that shard parameters and cache over a one-axis jax Mesh ("tp").

Everything here is layout; the model code is the same at any tp and XLA's sharding propagation (GSPMD) inserts
the collectives, except for the routed experts, which run under `shard_map` (see hybrid_jax/moe.py).

What is sharded, by which dimension (tp = N devices):
* attention: q and o by heads; k and v by KV heads, and when there are fewer KV heads K than N (N % K == 0) each
  KV head is duplicated N / K times so that every device holds the one its query heads read (the KV cache pool
  then holds N heads, one per device);
* Mamba2: by heads - in_proj columns, conv channels, dt_bias / A_log / D, the gated norm weight, out_proj rows,
  the conv state and the SSM state. B/C groups: by group when N divides them, else (N a multiple of the groups)
  each device keeps a copy of the one group its heads read. The fused in_proj ([z | xBC | dt]) and the conv
  channels ([x | B | C]) are stored shard-major - each device's block holds its heads' z, x, B, C, dt - so that a
  contiguous split is a split by heads (`tp_params`, `ModelConfig.tp`);
* MLPs and shared experts: by their inner dimension (column-parallel up/gate, row-parallel down);
* routed experts: by their inner dimension (every device holds every expert's 1/N slice, routes all tokens and
  adds its partial output in one all-reduce);
* embedding and lm_head: by vocabulary when N divides it; logits are gathered once, at the end;
* norms, routers, the router bias, MoE latent projections: replicated.

The same block ids and slot ids address every shard: the ledger and the scheduler do not change.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ConfigError, ModelConfig

AXIS = "tp"


@functools.lru_cache(maxsize=None)
def mesh_for(tp: int) -> Mesh:
    """The mesh of the first tp local devices, one axis named "tp"."""
    devices = jax.local_devices()
    if tp > len(devices):
        raise ConfigError(f"tensor_parallel_size={tp} but only {len(devices)} local device(s) "
                          f"({devices[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count")
    return Mesh(np.array(devices[:tp]), (AXIS,))


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


# ------------------------------------------------------------------------------------------ parameter layout

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


# ------------------------------------------------------------------------------------------ partition specs

# name -> the dimension (counted from the end) sharded over "tp"; absent: replicated. Stacked arrays have the
# layer axis first, expert weights [L, E, in, out].
_PARAM_DIM = {
    "mamba": {"in_proj": -1, "in_proj_b": -1, "conv_w": -2, "conv_b": -1, "dt_bias": -1, "A_log": -1, "D": -1,
              "norm_w": -1, "out_proj": -2},
    "attention": {"q": -1, "q_b": -1, "k": -1, "k_b": -1, "v": -1, "v_b": -1, "o": -2},
    "mlp": {"gate": -1, "gate_b": -1, "up": -1, "up_b": -1, "down": -2},
    "moe": {"experts_up": -1, "experts_gate": -1, "experts_down": -2, "shared_up": -1, "shared_up_b": -1,
            "shared_gate": -1, "shared_gate_b": -1, "shared_down": -2},
}


def _spec(ndim: int, dim: int | None) -> P:
    """dim (from the end) over "tp". Trailing Nones are left out, as jit writes the specs of its outputs: the
    same spec in and out keeps one compiled program per step shape."""
    if dim is None:
        return P()
    return P(*([None] * (ndim + dim)), AXIS)


def param_specs(params: dict, cfg: ModelConfig) -> dict:
    """A PartitionSpec per leaf of the stacked params of cfg (tp layout)."""
    by_vocab = cfg.vocab_size % cfg.tp == 0  # embed / lm_head [V, D]
    specs = {}
    for k, v in params.items():
        if k == "stack":
            specs["stack"] = {kind: {n: _spec(a.ndim, _PARAM_DIM.get(kind, {}).get(n)) for n, a in group.items()}
                              for kind, group in v.items()}
        else:
            specs[k] = _spec(v.ndim, -2 if k in ("embed", "lm_head") and by_vocab else None)
    return specs


def cache_specs(cfg: ModelConfig):
    """PartitionSpecs of the Cache pytree: KV pools by KV head, conv state by channel, SSM state by head."""
    from hybrid_jax.cache import Cache, MambaState, PagedKV

    kv = P(None, None, None, AXIS)          # [layers, blocks, block_size, kv heads, head_dim]
    return Cache(kv=PagedKV(k=kv, v=kv), mamba=MambaState(conv=P(None, None, AXIS),   # [layers, slots, C, W-1]
                                                          ssm=P(None, None, AXIS)))   # [layers, slots, H, P, N]


def named(specs, tp: int):
    mesh = mesh_for(tp)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_model(cfg: ModelConfig, params: dict, tp: int) -> tuple[ModelConfig, dict]:
    """(tp_config(cfg, tp), params in that layout placed on mesh_for(tp)). params: stacked or list form, in the
    checkpoint layout, numpy or jax. tp == 1 returns them unchanged."""
    from hybrid_jax.stack import stack_layers

    if tp == 1:
        return cfg, params
    tcfg = tp_config(cfg, tp)
    host = tp_params(stack_layers(params, cfg, xp=np), cfg, tp)
    return tcfg, jax.device_put(host, named(param_specs(host, tcfg), tp))


def replicated_sharding(cfg: ModelConfig):
    """Where a step's small inputs that come back from a step (sampled tokens) live: replicated over the mesh
    (None, the default device, at tp 1). Placing them there up front keeps one program per step shape."""
    return None if cfg.tp == 1 else NamedSharding(mesh_for(cfg.tp), P())


def constrain_cache(cache, cfg: ModelConfig):
    """Inside a jitted step: pin the cache to its sharding (no-op at tp 1), so that a step returns the cache
    exactly as it took it (donation aliases, nothing recompiles)."""
    if cfg.tp == 1:
        return cache
    return jax.lax.with_sharding_constraint(cache, named(cache_specs(cfg), cfg.tp))


def replicated(x, cfg: ModelConfig):
    """Inside a jitted step: gather x onto every device (no-op at tp 1) - the logits, once."""
    if cfg.tp == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh_for(cfg.tp), P()))
