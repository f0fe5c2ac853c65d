"""The mixture-of-experts sublayer (transformers NemotronHMoE / GraniteMoeHybridMoE, see config.MoEConfig).

Params of one "moe" sublayer (projections [in, out], experts [E, in, out]):
  norm [D]; router [D, E]; router_bias [E] float32 (NemotronH e_score_correction_bias);
  experts_up [E, Dx, I], experts_gate [E, Dx, I] (swiglu only), experts_down [E, I, Dx]  (Dx = cfg.expert_width);
  latent_in [D, Dx], latent_out [Dx, D] (+ _b biases) when moe.latent_size > 0;
  shared_up [D, Is], shared_gate [D, Is] (swiglu only), shared_down [Is, D] (+ _b biases) when Is > 0.

Expert compute: each token's top-k (token, expert) pairs are sorted by expert and run as one grouped matmul
(pallas_kernels.grouped_matmul) per projection, so the work follows the chosen experts, not the number of experts.
With tensor parallelism (cfg.tp > 1) the routed experts run under `shard_map`: every device holds every expert's
1/tp slice of the inner dimension, runs all the routed rows through it and the partial outputs meet in one psum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ModelConfig, MoEConfig
from hybrid_jax.mesh import AXIS, PARAM_DIM, mesh_for, spec
from pallas_kernels import grouped_matmul

EXPERTS = ("experts_up", "experts_gate", "experts_down")


def _linear(x, p, name):
    y = x @ p[name]
    b = p.get(name + "_b")
    return y if b is None else y + b


def route_sigmoid(x_ND, router_DE, bias_E, moe: MoEConfig):
    """NemotronH router: (weights [N,k] float32, expert ids [N,k] int32)."""
    scores = jax.nn.sigmoid(jnp.dot(x_ND.astype(jnp.float32), router_DE.astype(jnp.float32),
                                    precision=jax.lax.Precision.HIGHEST))
    choice = scores + bias_E.astype(jnp.float32)
    if moe.n_group > 1 and moe.topk_group < moe.n_group:
        N, E = choice.shape
        grouped = choice.reshape(N, moe.n_group, E // moe.n_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                    # [N, n_group]
        _, best = jax.lax.top_k(group_score, moe.topk_group)                   # [N, topk_group]
        keep = jnp.zeros((N, moe.n_group), bool).at[jnp.arange(N)[:, None], best].set(True)
        choice = jnp.where(jnp.repeat(keep, E // moe.n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, moe.top_k)
    w = jnp.take_along_axis(scores, idx, axis=1)
    if moe.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * moe.routed_scaling_factor, idx.astype(jnp.int32)


def route_softmax(x_ND, router_DE, moe: MoEConfig):
    """Granite router: logits in the parameter dtype, softmax over the top-k logits."""
    logits = (x_ND @ router_DE).astype(jnp.float32)
    top, idx = jax.lax.top_k(logits, moe.top_k)
    return jax.nn.softmax(top, axis=-1).astype(x_ND.dtype).astype(jnp.float32), idx.astype(jnp.int32)


def routed_experts(p, x_NX, w_NK, idx_NK, moe: MoEConfig, layer=None):
    """sum_k w[n,k] * expert_{idx[n,k]}(x[n]) -> [N, X] float32, as grouped matmuls over expert-sorted rows.
    layer: p's expert weights are the stacked [L, E, in, out] of every MoE layer and this is layer `layer`."""
    N, K = idx_NK.shape
    E = moe.num_experts
    flat = idx_NK.reshape(-1)
    order = jnp.argsort(flat, stable=True)                                    # (token, k) pairs by expert
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)
    rows = x_NX[order // K]
    up = grouped_matmul(rows, p["experts_up"], sizes, layer=layer)
    if moe.expert_kind == "relu2":
        h = jnp.square(jax.nn.relu(up))
    else:
        h = jax.nn.silu(grouped_matmul(rows, p["experts_gate"], sizes, layer=layer)) * up
    y = grouped_matmul(h, p["experts_down"], sizes, layer=layer).astype(jnp.float32)
    y = y * w_NK.reshape(-1)[order][:, None]
    per_pair = jnp.zeros_like(y).at[order].set(y).reshape(N, K, -1)
    return per_pair.sum(1)


def _routed_sharded(p, x_NX, w_NK, idx_NK, cfg: ModelConfig, layer=None):
    """routed_experts, split by the experts' inner dimension over the tensor parallel mesh (cfg.tp > 1)."""
    if cfg.tp == 1:
        return routed_experts(p, x_NX, w_NK, idx_NK, cfg.moe, layer)
    experts = {k: p[k] for k in EXPERTS if k in p}
    specs = {k: spec(a.ndim, PARAM_DIM["moe"][k]) for k, a in experts.items()}
    j = jnp.asarray(0 if layer is None else layer, jnp.int32)
    part = lambda e, x, w, i, j: jax.lax.psum(routed_experts(e, x, w, i, cfg.moe, None if layer is None else j),
                                              AXIS)
    f = jax.shard_map(part, mesh=mesh_for(cfg.tp), in_specs=(specs, P(), P(), P(), P()), out_specs=P(),
                      check_vma=False)
    return f(experts, x_NX, w_NK, idx_NK, j)


def _shared(p, x, moe: MoEConfig):
    if moe.expert_kind == "relu2":
        return _linear(jnp.square(jax.nn.relu(_linear(x, p, "shared_up"))), p, "shared_down")
    return _linear(jax.nn.silu(_linear(x, p, "shared_gate")) * _linear(x, p, "shared_up"), p, "shared_down")


def moe_block(p, x_BTD, cfg: ModelConfig, layer=None):
    """The MoE sublayer's output (before the residual add) for normed input x [B,T,D]. layer: p's expert weights
    are stacked over the MoE layers ([L, E, in, out], the rest of p is this layer's) and this is layer `layer`:
    the expert compute reads only the chosen experts' weights of it."""
    moe = cfg.moe
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    if moe.router == "sigmoid":
        w, idx = route_sigmoid(x, p["router"], p["router_bias"], moe)
    else:
        w, idx = route_softmax(x, p["router"], moe)
    xe = _linear(x, p, "latent_in") if moe.latent_size else x
    y = _routed_sharded(p, xe, w, idx, cfg, layer).astype(x.dtype)
    if moe.latent_size:
        y = _linear(y, p, "latent_out")
    if moe.shared_intermediate_size:
        y = y + _shared(p, x, moe)
    return y.reshape(B, T, D)
