"""Read a Hugging Face checkpoint directory (config.json + model.safetensors or a sharded index) into params.

Params pytree: {"embed": [V,D], "final_norm": [D], "lm_head": [V,D] (absent when tied),
"layers": [one dict per sublayer]}; projection weights are stored [in, out], expert weights [E, in, out].
Mixture-of-experts layers are read in the layouts the checkpoints store: NemotronH one tensor per expert
(`mixer.experts.{e}.up_proj.weight`; the fused `mixer.experts.up_proj` [E, out, in] of transformers' in-memory
model is accepted too), Granite fused over experts (`block_sparse_moe.input_linear.weight` [E, 2I, D] holding
[gate; up], `output_linear.weight` [E, D, I], `router.layer.weight`). With `stacked=True` the layers come
in hybrid_jax/stack.py's stacked form instead ({"stack": {kind: {name: [L_kind, ...]}}}), stacked on the host.

dtype: "auto" (the default) takes the checkpoint's `torch_dtype` (bfloat16 for the released hybrid models;
float32 when config.json names none); "float32", "bfloat16" or "float16" override it. Mamba's `A_log`, `D` and
`dt_bias` stay float32 whatever the dtype. Tensors are read in their stored dtype (bfloat16 as ml_dtypes' bfloat16,
which jax uses) and cast only when the target differs, so a bf16 checkpoint loaded as bf16 is bit-exact and never
passes through float32.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ConfigError, ModelConfig, from_hf
from hybrid_jax.stack import KINDS
from hybrid_jax.weights_file import (STORAGE_DTYPES, CheckpointError, Weights, read_raw_tensor, release_freed_memory,
                                     storage_dtype)


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(cfg_path) as f:
        return json.load(f)


FINAL_NORM = {"nemotron_h": "norm_f.weight", "granitemoehybrid": "norm.weight", "bamba": "final_layernorm.weight"}


def top_level_names(cfg: ModelConfig) -> tuple[str, str]:
    """(embedding, final norm) tensor names as real checkpoints of cfg's family write them."""
    if cfg.family == "nemotron_h":
        return "backbone.embeddings.weight", "backbone." + FINAL_NORM[cfg.family]
    return "model.embed_tokens.weight", "model." + FINAL_NORM[cfg.family]


def _prefix(weights: Weights, cfg: ModelConfig) -> str:
    if cfg.family == "nemotron_h":
        for p in ("backbone.", "model."):
            if p + "embeddings.weight" in weights.keys() or p + "embed_tokens.weight" in weights.keys():
                return p
        raise CheckpointError("NemotronH checkpoint has neither backbone.embeddings nor model.embeddings weights")
    return "model."


def _mamba_names(pre: str) -> dict[str, str]:
    return {"in_proj": pre + "in_proj.weight", "in_proj_b": pre + "in_proj.bias", "conv_w": pre + "conv1d.weight",
            "conv_b": pre + "conv1d.bias", "dt_bias": pre + "dt_bias", "A_log": pre + "A_log", "D": pre + "D",
            "norm_w": pre + "norm.weight", "out_proj": pre + "out_proj.weight", "out_proj_b": pre + "out_proj.bias"}


def _attn_names(pre: str) -> dict[str, str]:
    out = {}
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        out[ours] = f"{pre}{theirs}.weight"
        out[ours + "_b"] = f"{pre}{theirs}.bias"
    return out


@dataclasses.dataclass(frozen=True)
class PerExpert:
    """Our [E, in, out] tensor from one torch [out, in] tensor per expert (`pattern.format(e)`), or from `fused`
    [E, out, in] when the per-expert tensors are absent."""
    pattern: str
    num: int
    fused: str


@dataclasses.dataclass(frozen=True)
class FusedPart:
    """Our tensor from part `part` of `parts` equal slices of torch tensor `name` along its out dim (-2)."""
    name: str
    part: int
    parts: int = 2


def _moe_names(cfg: ModelConfig, lp: str) -> dict:
    """A MoE sublayer's names (lp: the layer prefix, e.g. "backbone.layers.3.")."""
    E = cfg.moe.num_experts
    if cfg.family == "nemotron_h":
        m = lp + "mixer."
        names: dict = {"norm": lp + "norm.weight", "router": m + "gate.weight",
                       "router_bias": m + "gate.e_score_correction_bias",
                       "experts_up": PerExpert(m + "experts.{}.up_proj.weight", E, m + "experts.up_proj"),
                       "experts_down": PerExpert(m + "experts.{}.down_proj.weight", E, m + "experts.down_proj")}
        for ours, theirs in (("shared_up", "shared_experts.up_proj"), ("shared_down", "shared_experts.down_proj"),
                             ("latent_in", "fc1_latent_proj"), ("latent_out", "fc2_latent_proj")):
            if ours.startswith("latent") and not cfg.moe.latent_size:
                continue
            if ours.startswith("shared") and not cfg.moe.shared_intermediate_size:
                continue
            names[ours], names[ours + "_b"] = m + theirs + ".weight", m + theirs + ".bias"
        return names
    moe = lp + "block_sparse_moe."
    names = {"norm": lp + "post_attention_layernorm.weight", "router": moe + "router.layer.weight",
             "experts_gate": FusedPart(moe + "input_linear.weight", 0),
             "experts_up": FusedPart(moe + "input_linear.weight", 1),
             "experts_down": moe + "output_linear.weight"}
    if cfg.moe.shared_intermediate_size:
        names |= {"shared_gate": FusedPart(lp + "shared_mlp.input_linear.weight", 0),
                  "shared_up": FusedPart(lp + "shared_mlp.input_linear.weight", 1),
                  "shared_down": lp + "shared_mlp.output_linear.weight"}
    return names


def expected_shapes(cfg: ModelConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """Our stored shape of every parameter of a sublayer kind (projections [in, out])."""
    D = cfg.hidden_size
    if kind == "mamba":
        proj = cfg.mamba_inner + cfg.conv_dim + cfg.mamba_heads
        return {"norm": (D,), "in_proj": (D, proj), "in_proj_b": (proj,), "conv_w": (cfg.conv_dim, cfg.d_conv),
                "conv_b": (cfg.conv_dim,), "dt_bias": (cfg.mamba_heads,), "A_log": (cfg.mamba_heads,),
                "D": (cfg.mamba_heads,), "norm_w": (cfg.mamba_inner,), "out_proj": (cfg.mamba_inner, D),
                "out_proj_b": (D,)}
    if kind == "attention":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return {"norm": (D,), "q": (D, q), "q_b": (q,), "k": (D, kv), "k_b": (kv,), "v": (D, kv), "v_b": (kv,),
                "o": (q, D), "o_b": (D,)}
    if kind == "moe":
        moe, X = cfg.moe, cfg.expert_width
        E, I, S, Lt = moe.num_experts, moe.intermediate_size, moe.shared_intermediate_size, moe.latent_size
        return {"norm": (D,), "router": (D, E), "router_bias": (E,), "experts_up": (E, X, I),
                "experts_gate": (E, X, I), "experts_down": (E, I, X), "shared_up": (D, S), "shared_gate": (D, S),
                "shared_down": (S, D), "shared_up_b": (S,), "shared_down_b": (D,), "latent_in": (D, Lt),
                "latent_out": (Lt, D), "latent_in_b": (Lt,), "latent_out_b": (D,)}
    I = cfg.intermediate_size
    return {"norm": (D,), "gate": (D, I), "up": (D, I), "down": (I, D), "up_b": (I,), "down_b": (D,),
            "gate_b": (I,)}


#: Biases a checkpoint may leave out (the loader then leaves them out of the params).
OPTIONAL_PARAMS = {"in_proj_b", "out_proj_b", "conv_b", "q_b", "k_b", "v_b", "o_b", "up_b", "down_b", "gate_b",
                   "shared_up_b", "shared_down_b", "latent_in_b", "latent_out_b"}


def sublayer_sources(cfg: ModelConfig, pre: str) -> list[dict[str, str | Callable]]:
    """For each sublayer: our name -> checkpoint tensor name, or a PerExpert / FusedPart spec for expert weights
    (Granite's fused dense MLP input keeps its own key "gate_up")."""
    out = []
    if cfg.family == "nemotron_h":
        for i, kind in enumerate(cfg.sublayers):
            lp = f"{pre}layers.{i}."
            names: dict = {"norm": lp + "norm.weight"}
            if kind == "moe":
                names = _moe_names(cfg, lp)
            elif kind == "mamba":
                names |= _mamba_names(lp + "mixer.")
            elif kind == "attention":
                names |= _attn_names(lp + "mixer.")
            else:
                names |= {"up": lp + "mixer.up_proj.weight", "down": lp + "mixer.down_proj.weight",
                          "up_b": lp + "mixer.up_proj.bias", "down_b": lp + "mixer.down_proj.bias"}
            out.append(names)
        return out
    for j in range(len(cfg.sublayers) // 2):
        lp = f"{pre}layers.{j}."
        kind = cfg.sublayers[2 * j]
        mixer: dict = {"norm": lp + "input_layernorm.weight"}
        mixer |= _mamba_names(lp + "mamba.") if kind == "mamba" else _attn_names(lp + "self_attn.")
        if cfg.sublayers[2 * j + 1] == "moe":
            mlp = _moe_names(cfg, lp)
        elif cfg.family == "granitemoehybrid":
            mlp = {"norm": lp + "post_attention_layernorm.weight", "gate_up": lp + "shared_mlp.input_linear.weight",
                   "down": lp + "shared_mlp.output_linear.weight"}
        else:
            mlp = {"norm": lp + "pre_ff_layernorm.weight", "gate": lp + "feed_forward.gate_proj.weight",
                   "up": lp + "feed_forward.up_proj.weight", "down": lp + "feed_forward.down_proj.weight",
                   "gate_b": lp + "feed_forward.gate_proj.bias", "up_b": lp + "feed_forward.up_proj.bias",
                   "down_b": lp + "feed_forward.down_proj.bias"}
        out += [mixer, mlp]
    return out


def _to_ours(name: str, a: np.ndarray) -> np.ndarray:
    if name == "conv_w":
        return a.reshape(a.shape[0], a.shape[-1])  # torch [C, 1, W]
    if a.ndim == 2:
        return a.T  # torch Linear [out, in] -> [in, out]
    if a.ndim == 3:
        return a.transpose(0, 2, 1)  # experts [E, out, in] -> [E, in, out]
    return a


def read_spec(w, spec, keys) -> tuple[np.ndarray, str]:
    """The torch-layout tensor a source spec names (a name, PerExpert or FusedPart) and a name for messages."""
    if isinstance(spec, PerExpert):
        names = [spec.pattern.format(e) for e in range(spec.num)]
        if names[0] not in keys and spec.fused in keys:
            return w.get(spec.fused), spec.fused
        return np.stack([w.get(n) for n in names]), spec.pattern.format("*")
    if isinstance(spec, FusedPart):
        a = w.get(spec.name)
        n = a.shape[-2]
        if n % spec.parts:
            raise CheckpointError(f"weight {spec.name!r} has shape {tuple(a.shape)}: its dim -2 does not split "
                                  f"into {spec.parts} equal parts")
        k = n // spec.parts
        return a[..., spec.part * k:(spec.part + 1) * k, :], spec.name
    return w.get(spec), spec


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: Mamba parameters that enter exp/softplus of the recurrence, and the MoE router's correction bias (float32 in
#: transformers whatever the model dtype): float32 whatever the dtype.
FLOAT32_PARAMS = ("A_log", "D", "dt_bias", "router_bias")


def resolve_dtype(cfg: ModelConfig, dtype="auto") -> jnp.dtype:
    """The parameter (and cache) dtype: "auto" (or None) -> the checkpoint's torch_dtype (cfg.torch_dtype);
    "float32" / "bfloat16" / "float16" (or an alias of weights_file.DTYPE_ALIASES, or a dtype) -> that. Raises
    ConfigError for anything else."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        name, where = cfg.torch_dtype, f"the checkpoint's torch_dtype {cfg.torch_dtype!r}"
    else:
        name, where = dtype, f"dtype {dtype!r}"
    if isinstance(name, str):
        try:
            return jnp.dtype(STORAGE_DTYPES[storage_dtype(name.strip())])
        except ValueError:
            pass
    else:
        try:
            d = jnp.dtype(name)
        except TypeError:
            d = None
        if d in [jnp.dtype(t) for t in STORAGE_DTYPES.values()]:
            return d
    raise ConfigError(f"{where} is not a supported parameter dtype; pass --dtype (dtype=) one of "
                      f"float32, bfloat16, float16")


def _layer_readers(w: Weights, cfg: ModelConfig, kind: str, names: dict, keys: set, convert) -> dict:
    """{our name: a function reading that parameter of one sublayer, in our layout and dtype}; nothing is read
    yet. convert(a, our name, expected shape, checkpoint name) checks the shape and casts."""
    shapes = expected_shapes(cfg, kind)
    out = {}
    for ours, theirs in names.items():
        if ours == "gate_up":  # Granite fuses [gate; up] along the output dim
            def half(theirs=theirs, which=0):
                a = w.get(theirs)
                if a.shape != (2 * cfg.intermediate_size, cfg.hidden_size):
                    raise CheckpointError(f"weight {theirs!r} has shape {tuple(a.shape)}, expected "
                                          f"{(2 * cfg.intermediate_size, cfg.hidden_size)}")
                part = a[cfg.intermediate_size:] if which else a[:cfg.intermediate_size]
                name = ("gate", "up")[which]
                return convert(part.T, name, shapes[name], theirs)
            out["gate"], out["up"] = half, functools.partial(half, which=1)
            continue
        if ours in OPTIONAL_PARAMS and theirs not in keys:
            continue

        def read(ours=ours, theirs=theirs):
            a, where = read_spec(w, theirs, keys)
            return convert(_to_ours(ours, a), ours, shapes[ours], where)
        out[ours] = read
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked_LX, j, x_X):
    """stacked_LX with layer j replaced by x_X; donates stacked_LX (updated in place)."""
    return jax.lax.dynamic_update_index_in_dim(stacked_LX, x_X.astype(stacked_LX.dtype), j, 0)


def _stacked(readers: list[dict], name: str, on_host: bool):
    """One stacked parameter [layers of a kind, ...], filled one layer at a time (a bias a layer lacks: zeros):
    on the device (never a host copy of the whole stack), or with on_host a numpy array."""
    out = None
    for j, r in enumerate(readers):
        if name in r:
            a = r[name]()
            if out is None:
                shape = (len(readers),) + a.shape
                out = np.zeros(shape, a.dtype) if on_host else jnp.zeros(shape, a.dtype)
            if on_host:
                out[j] = a
            else:
                out = jax.block_until_ready(_set_layer(out, j, a))
            del a
            release_freed_memory()  # the layer's host copy, before the next is read
    return out


def load_params(path: str, cfg: ModelConfig, dtype="auto", stacked: bool = False, on_host: bool = False) -> dict:
    """Params of the checkpoint at path for cfg. dtype: see resolve_dtype. stacked: the stacked layer form of
    hybrid_jax.stack.stack_layers, each stacked parameter filled on the device one layer at a time (host memory
    while loading: what the device holds plus one tensor). on_host (with stacked): numpy arrays instead, for a
    caller that places them itself (tensor parallel sharding)."""
    dtype = resolve_dtype(cfg, dtype)
    w = Weights(path)
    pre = _prefix(w, cfg)
    keys = set(w.keys())
    # device_put, not jnp.asarray: the latter copies a numpy array on the host first (a second transient copy)
    place = (lambda a: a) if on_host and stacked else jax.device_put

    def convert(a: np.ndarray, name: str, shape: tuple[int, ...], where: str) -> np.ndarray:
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"weight {where!r} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                                  f"(our layout {name})")
        # Mamba A_log, D, dt_bias (and the router bias) stay float32.
        dt = np.dtype(jnp.float32 if name in FLOAT32_PARAMS else dtype)
        return a.astype(dt) if a.dtype != dt else a

    V, D = cfg.vocab_size, cfg.hidden_size
    embed_name = pre + ("embeddings.weight" if pre + "embeddings.weight" in keys else "embed_tokens.weight")
    final = pre + FINAL_NORM[cfg.family]
    top = [("embed", embed_name, (V, D)), ("final_norm", final, (D,))]
    if not cfg.tie_word_embeddings:
        top.append(("lm_head", "lm_head.weight", (V, D)))
    # The largest single tensors first, while the device holds little.
    params = {ours: place(convert(w.get(theirs), ours, shape, theirs)) for ours, theirs, shape in top}
    readers = [_layer_readers(w, cfg, kind, names, keys, convert)
               for kind, names in zip(cfg.sublayers, sublayer_sources(cfg, pre))]
    if not stacked:
        params["layers"] = [{ours: place(read()) for ours, read in r.items()} for r in readers]
        return params
    params["stack"] = {}
    for kind in KINDS:
        group = [r for k, r in zip(cfg.sublayers, readers) if k == kind]
        if group:
            params["stack"][kind] = {}
            for n in sorted(set().union(*group)):
                params["stack"][kind][n] = _stacked(group, n, on_host)
    return params


def load_pretrained(path: str, dtype="auto", stacked: bool = False,
                    on_host: bool = False) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face checkpoint directory.

    dtype: "auto" (default) takes the checkpoint config's torch_dtype (bfloat16 for the released models, float32
    when it names none); "float32", "bfloat16", "float16" override it. A_log, D and dt_bias stay float32.
    stacked: params in hybrid_jax.stack's stacked form (built on the host; the device never holds both forms)
    instead of the list form {"layers": [...]}; with on_host those stay numpy arrays on the host.
    Raises FileNotFoundError, ConfigError or CheckpointError with a message naming what is wrong."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg = from_hf(read_config(path))
    return cfg, load_params(path, cfg, dtype, stacked=stacked, on_host=on_host)


__all__ = ["DTYPE_CHOICES", "FLOAT32_PARAMS", "OPTIONAL_PARAMS", "CheckpointError", "ConfigError", "FusedPart",
           "PerExpert", "load_pretrained", "load_params", "read_config", "read_raw_tensor", "read_spec",
           "resolve_dtype", "sublayer_sources", "top_level_names"]
