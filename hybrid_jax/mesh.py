"""Tensor parallelism's mesh and partition specs: which dimension of each parameter and cache pool is sharded
over a one-axis jax Mesh ("tp"). Below the cache, the layers and the stack; imports nothing of hybrid_jax but the
config. Placing a model on the mesh (its shard-major layout, `shard_model`) is hybrid_jax/sharding.py.

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
  contiguous split is a split by heads (`sharding.tp_params`, `ModelConfig.tp`);
* MLPs and shared experts: by their inner dimension (column-parallel up/gate, row-parallel down);
* routed experts: by their inner dimension (every device holds every expert's 1/N slice, routes all tokens and
  adds its partial output in one all-reduce);
* embedding and lm_head: by vocabulary when N divides it; logits are gathered once, at the end;
* norms, routers, the router bias, MoE latent projections: replicated.

The same block ids and slot ids address every shard: the ledger and the scheduler do not change.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ConfigError, ModelConfig

AXIS = "tp"


@functools.lru_cache(maxsize=16)
def mesh_for(tp: int) -> Mesh:
    """The mesh of the first tp local devices, one axis named "tp"."""
    devices = jax.local_devices()
    if tp > len(devices):
        raise ConfigError(f"tensor_parallel_size={tp} but only {len(devices)} local device(s) "
                          f"({devices[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count")
    return Mesh(np.array(devices[:tp]), (AXIS,))


# name -> the dimension (counted from the end) sharded over "tp"; absent: replicated. Stacked arrays have the
# layer axis first, expert weights [L, E, in, out].
PARAM_DIM = {
    "mamba": {"in_proj": -1, "in_proj_b": -1, "conv_w": -2, "conv_b": -1, "dt_bias": -1, "A_log": -1, "D": -1,
              "norm_w": -1, "out_proj": -2},
    "attention": {"q": -1, "q_b": -1, "k": -1, "k_b": -1, "v": -1, "v_b": -1, "o": -2},
    "mlp": {"gate": -1, "gate_b": -1, "up": -1, "up_b": -1, "down": -2},
    "moe": {"experts_up": -1, "experts_gate": -1, "experts_down": -2, "shared_up": -1, "shared_up_b": -1,
            "shared_gate": -1, "shared_gate_b": -1, "shared_down": -2},
}


def spec(ndim: int, dim: int | None) -> P:
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
            specs["stack"] = {kind: {n: spec(a.ndim, PARAM_DIM.get(kind, {}).get(n)) for n, a in group.items()}
                              for kind, group in v.items()}
        else:
            specs[k] = spec(v.ndim, -2 if k in ("embed", "lm_head") and by_vocab else None)
    return specs


def named(specs, tp: int):
    """The pytree of PartitionSpecs `specs` as NamedShardings over mesh_for(tp)."""
    mesh = mesh_for(tp)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(x, cfg: ModelConfig):
    """Inside a jitted step: gather x onto every device (no-op at tp 1) - the logits, once."""
    if cfg.tp == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh_for(cfg.tp), P()))
