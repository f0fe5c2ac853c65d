"""The layer stack as one `lax.scan` over Mamba units: one compiled body whatever the depth.

A unit is one Mamba sublayer followed by its *tail*, the attention, MLP and MoE sublayers up to the next Mamba
sublayer (NemotronH "M-", "M", "M*-", "ME"; Granite/Bamba "M-", "M-*-"). The scan runs over units; the tail is a
fixed number of positions (the longest tail of the model), each `lax.switch`ing between nothing, attention, MLP
and MoE. A 56-layer Nemotron-H compiles one Mamba sublayer and two of each other kind instead of 56 sublayers.
Sublayers before the first Mamba sublayer are unrolled. MoE touches no cache: it is one more compute branch.

The cache pools must never enter a `lax.switch`: XLA copies a buffer that a conditional passes through, which
would copy a whole pool per sublayer. So the Mamba update (unconditional) owns the Mamba pools, and attention is
split around its KV write: `qkv` inside a switch, the scatter of k/v outside it (into the scratch block when the
position is not attention), the read of the pages inside a second switch that only reads the pools.

Stacked params: {"embed", "final_norm", "lm_head"?, "stack": {kind: {name: [L_kind, ...]}}}. The loader's list
form ({"layers": [one dict per sublayer]}) is accepted everywhere and stacked on the fly.
`HYBRID_LAYER_LOOP=unroll` (read once, when this module is imported) unrolls the scan (same program structure,
every index static) for comparison.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import layers as L
from hybrid_jax import moe as M
from hybrid_jax.config import ModelConfig

KINDS = ("mamba", "attention", "mlp", "moe")
NONE, ATTN, MLP, MOE = 0, 1, 2, 3
_TAIL_CODE = {"attention": ATTN, "mlp": MLP, "moe": MOE}
#: The layer scan unrolled (HYBRID_LAYER_LOOP=unroll), read at import: never while a step is traced.
UNROLL_LAYERS = os.environ.get("HYBRID_LAYER_LOOP", "scan").strip().lower() == "unroll"


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    prefix: tuple[tuple[str, int], ...]   # (kind, index within kind) of the sublayers before the first Mamba
    tail_kind: np.ndarray                 # [units, tail] NONE | ATTN | MLP | MOE
    tail_index: np.ndarray                # [units, tail] index within its kind (0 where NONE)

    @property
    def units(self) -> int:
        return self.tail_kind.shape[0]


@functools.lru_cache(maxsize=64)
def unit_plan(cfg: ModelConfig) -> UnitPlan:
    seen = {k: 0 for k in KINDS}
    prefix, tails = [], []
    for kind in cfg.sublayers:
        if kind == "mamba":
            tails.append([])
        elif tails:
            tails[-1].append((_TAIL_CODE[kind], seen[kind]))
        else:
            prefix.append((kind, seen[kind]))
        seen[kind] += 1
    width = max([len(t) for t in tails] + [1])
    kind_arr = np.zeros((len(tails), width), np.int32)
    idx_arr = np.zeros((len(tails), width), np.int32)
    for u, t in enumerate(tails):
        for i, (code, j) in enumerate(t):
            kind_arr[u, i], idx_arr[u, i] = code, j
    return UnitPlan(tuple(prefix), kind_arr, idx_arr)


def stack_layers(params: dict, cfg: ModelConfig, xp=jnp) -> dict:
    """List form -> stacked form (xp=np keeps host arrays). A bias one layer lacks is stacked as zeros."""
    if "stack" in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    out["stack"] = {}
    for kind in KINDS:
        group = [p for k, p in zip(cfg.sublayers, params["layers"]) if k == kind]
        if not group:
            continue
        names = sorted(set().union(*group))
        ref = {n: next(p[n] for p in group if n in p) for n in names}
        out["stack"][kind] = {n: xp.stack([p[n] if n in p else xp.zeros_like(ref[n]) for p in group])
                              for n in names}
    return out


def residual(h, out, cfg: ModelConfig):
    return h + out * jnp.asarray(cfg.residual_multiplier, h.dtype)


@dataclasses.dataclass(frozen=True)
class Mixers:
    """The cache-specific parts of the stack, each over a state pytree the caller owns.

    mamba(p, x, state, j) -> (out, state)           Mamba sublayer j (never inside a switch)
    write_kv(state, j, k, v, enabled) -> state       store attention layer j's k/v (enabled: scalar bool)
    attend(p, q, k, v, state, j) -> o [B,T,H*D]      attention of layer j; reads state, never returns it
    """
    mamba: Callable
    write_kv: Callable
    attend: Callable


def _layer(stack, kind, j):
    return jax.tree.map(lambda a: a[j], stack[kind])


def _position(stack, h, state, code, j, cfg: ModelConfig, mx: Mixers, pos_BT):
    """One tail position: nothing, attention, MLP or MoE, chosen by the traced `code` (switch index)."""
    B, T = pos_BT.shape
    dims = (B, T, cfg.num_heads, cfg.head_dim), (B, T, cfg.num_kv_heads, cfg.head_dim)
    zeros = lambda: (jnp.zeros(dims[0], h.dtype), jnp.zeros(dims[1], h.dtype), jnp.zeros(dims[1], h.dtype))
    has_attn = "attention" in stack

    def qkv_attn(h, j):
        p = _layer(stack, "attention", j)
        q, k, v = L.qkv(p, L.rms_norm(h, p["norm"], cfg.rms_eps), pos_BT, cfg)
        return q, k, v

    n_codes = 4 if "moe" in stack else 3  # a dense model's programs have no MoE branch at all
    q, k, v = (jax.lax.switch(code, [lambda h, j: zeros(), qkv_attn] + [lambda h, j: zeros()] * (n_codes - 2), h, j)
               if has_attn else zeros())
    if has_attn:
        state = mx.write_kv(state, jnp.where(code == ATTN, j, 0), k, v, code == ATTN)

    def attn(h, q, k, v, state, j):
        p = _layer(stack, "attention", j)
        return residual(h, L.linear(mx.attend(p, q, k, v, state, j), p, "o"), cfg)

    def mlp(h, q, k, v, state, j):
        p = _layer(stack, "mlp", j)
        return residual(h, L.mlp(p, L.rms_norm(h, p["norm"], cfg.rms_eps), cfg), cfg)

    def moe(h, q, k, v, state, j):
        # The expert weights stay stacked: slicing layer j of them would copy all its experts' weights.
        p = {n: (a if n in M.EXPERTS else a[j]) for n, a in stack["moe"].items()}
        return residual(h, M.moe_block(p, L.rms_norm(h, p["norm"], cfg.rms_eps), cfg, layer=j), cfg)

    same = lambda h, *a: h
    branches = [same, attn if has_attn else same, mlp if "mlp" in stack else same, moe][:n_codes]
    return jax.lax.switch(code, branches, h, q, k, v, state, j), state


def run_stack(params: dict, h_BTD, pos_BT, state, cfg: ModelConfig, mx: Mixers):
    """h after every sublayer of cfg (tokens at positions pos_BT), threading `state` (any pytree) through the
    mixers. Returns (h, state)."""
    stack = stack_layers(params, cfg)["stack"]
    plan = unit_plan(cfg)
    pos = functools.partial(_position, stack, cfg=cfg, mx=mx, pos_BT=pos_BT)
    h = h_BTD
    for kind, j in plan.prefix:
        h, state = pos(h, state, jnp.int32(_TAIL_CODE[kind]), jnp.int32(j))
    if plan.units == 0:
        return h, state

    def unit(carry, xs):
        h, state = carry
        u, codes, idx = xs
        p = _layer(stack, "mamba", u)
        out, state = mx.mamba(p, L.rms_norm(h, p["norm"], cfg.rms_eps), state, u)
        h = residual(h, out, cfg)
        for i in range(codes.shape[0]):
            h, state = pos(h, state, codes[i], idx[i])
        return (h, state), None

    xs = (jnp.arange(plan.units, dtype=jnp.int32), jnp.asarray(plan.tail_kind), jnp.asarray(plan.tail_index))
    (h, state), _ = jax.lax.scan(unit, (h, state), xs, unroll=plan.units if UNROLL_LAYERS else 1)
    return h, state
