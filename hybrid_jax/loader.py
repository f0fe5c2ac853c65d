"""Read a Hugging Face checkpoint directory (config.json + model.safetensors or a sharded index) into params.

Params pytree: {"embed": [V,D], "final_norm": [D], "lm_head": [V,D] (absent when tied),
"layers": [one dict per sublayer]}; projection weights are stored [in, out]. With `stacked=True` the layers come
in hybrid_jax/stack.py's stacked form instead ({"stack": {kind: {name: [L_kind, ...]}}}), stacked on the host.

dtype: "auto" (the default) takes the checkpoint's `torch_dtype` (bfloat16 for the released hybrid models;
float32 when config.json names none); "float32", "bfloat16" or "float16" override it. Mamba's `A_log`, `D` and
`dt_bias` stay float32 whatever the dtype. Tensors are read in their stored dtype (bfloat16 as ml_dtypes' bfloat16,
which jax uses) and cast only when the target differs, so a bf16 checkpoint loaded as bf16 is bit-exact and never
passes through float32.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # also registers "bfloat16" with numpy, which safetensors' numpy backend needs for BF16
import numpy as np
from safetensors import safe_open

from hybrid_jax.config import ConfigError, ModelConfig, from_hf


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or holds weights that do not fit the config."""


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(cfg_path) as f:
        return json.load(f)


class _Weights:
    """Lazy name -> numpy array over one or many safetensors files."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
        self._where: dict[str, str] = {}
        for fn in files:
            full = os.path.join(path, fn)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"checkpoint shard {full!r} named in the index is missing")
            with safe_open(full, "numpy") as f:
                for k in f.keys():
                    self._where[k] = full
        self._open: dict[str, object] = {}

    def keys(self):
        return self._where.keys()

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"weight {name!r} is missing from the checkpoint")
        fn = self._where[name]
        if fn not in self._open:
            self._open[fn] = safe_open(fn, "numpy").__enter__()
        try:
            return self._open[fn].get_tensor(name)
        except (TypeError, ValueError):  # a safetensors numpy backend that cannot read the dtype (old: BF16)
            return read_raw_tensor(fn, name)


# safetensors dtype -> numpy dtype, for read_raw_tensor
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_raw_tensor(filename: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file read from the file format itself (8-byte little-endian header length,
    JSON header, raw little-endian data): bfloat16 comes back as ml_dtypes.bfloat16 whatever safetensors does."""
    with open(filename, "rb") as f:
        (n,) = np.frombuffer(f.read(8), "<u8")
        header = json.loads(f.read(int(n)))
        if name not in header:
            raise CheckpointError(f"weight {name!r} is missing from {filename!r}")
        info = header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"weight {name!r} has dtype {info['dtype']}, which this loader cannot read")
        begin, end = info["data_offsets"]
        f.seek(8 + int(n) + begin)
        data = f.read(end - begin)
    dt = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    return np.frombuffer(data, dt).astype(dt.newbyteorder("="), copy=False).reshape(info["shape"])


FINAL_NORM = {"nemotron_h": "norm_f.weight", "granitemoehybrid": "norm.weight", "bamba": "final_layernorm.weight"}


def top_level_names(cfg: ModelConfig) -> tuple[str, str]:
    """(embedding, final norm) tensor names as real checkpoints of cfg's family write them."""
    if cfg.family == "nemotron_h":
        return "backbone.embeddings.weight", "backbone." + FINAL_NORM[cfg.family]
    return "model.embed_tokens.weight", "model." + FINAL_NORM[cfg.family]


def _prefix(weights: _Weights, cfg: ModelConfig) -> str:
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
    I = cfg.intermediate_size
    return {"norm": (D,), "gate": (D, I), "up": (D, I), "down": (I, D), "up_b": (I,), "down_b": (D,),
            "gate_b": (I,)}


_OPTIONAL = {"in_proj_b", "out_proj_b", "conv_b", "q_b", "k_b", "v_b", "o_b", "up_b", "down_b", "gate_b"}


def sublayer_sources(cfg: ModelConfig, pre: str) -> list[dict[str, str | Callable]]:
    """For each sublayer: our name -> checkpoint tensor name (or a callable producing the tensor)."""
    out = []
    if cfg.family == "nemotron_h":
        for i, kind in enumerate(cfg.sublayers):
            lp = f"{pre}layers.{i}."
            names: dict = {"norm": lp + "norm.weight"}
            if kind == "mamba":
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
        if cfg.family == "granitemoehybrid":
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
    return a


_DTYPE_NAMES = {"float32": jnp.float32, "float": jnp.float32, "fp32": jnp.float32,
                "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                "float16": jnp.float16, "half": jnp.float16, "fp16": jnp.float16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: Mamba parameters that enter exp/softplus of the recurrence: float32 whatever the dtype.
FLOAT32_PARAMS = ("A_log", "D", "dt_bias")


def resolve_dtype(cfg: ModelConfig, dtype="auto") -> jnp.dtype:
    """The parameter (and cache) dtype: "auto" (or None) -> the checkpoint's torch_dtype (cfg.torch_dtype);
    "float32" / "bfloat16" / "float16" (or a dtype) -> that. Raises ConfigError for anything else."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        name, where = cfg.torch_dtype, f"the checkpoint's torch_dtype {cfg.torch_dtype!r}"
    else:
        name, where = dtype, f"dtype {dtype!r}"
    if isinstance(name, str):
        key = name.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return jnp.dtype(_DTYPE_NAMES[key])
    else:
        try:
            d = jnp.dtype(name)
        except TypeError:
            d = None
        if d in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return d
    raise ConfigError(f"{where} is not a supported parameter dtype; pass --dtype (dtype=) one of "
                      f"float32, bfloat16, float16")


def load_params(path: str, cfg: ModelConfig, dtype="auto", stacked: bool = False) -> dict:
    """Params of the checkpoint at path for cfg. dtype: see resolve_dtype. stacked: return the stacked layer form
    of hybrid_jax.stack.stack_layers, built from host arrays before anything reaches the device."""
    dtype = resolve_dtype(cfg, dtype)
    w = _Weights(path)
    pre = _prefix(w, cfg)
    keys = set(w.keys())

    def put(a: np.ndarray, name: str, shape: tuple[int, ...], where: str):
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"weight {where!r} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                                  f"(our layout {name})")
        # Mamba A_log, D, dt_bias stay float32: they enter exp/softplus of the recurrence.
        dt = np.dtype(jnp.float32 if name in FLOAT32_PARAMS else dtype)
        if a.dtype != dt:
            a = a.astype(dt)
        # Host array in stacked mode (stacked below, then transferred); else straight to the device, one at a time.
        return a if stacked else jnp.asarray(a)

    layers = []
    for kind, names in zip(cfg.sublayers, sublayer_sources(cfg, pre)):
        shapes = expected_shapes(cfg, kind)
        p = {}
        for ours, theirs in names.items():
            if ours == "gate_up":  # Granite fuses [gate; up] along the output dim
                a = w.get(theirs)
                if a.shape != (2 * cfg.intermediate_size, cfg.hidden_size):
                    raise CheckpointError(f"weight {theirs!r} has shape {tuple(a.shape)}, expected "
                                          f"{(2 * cfg.intermediate_size, cfg.hidden_size)}")
                p["gate"] = put(a[:cfg.intermediate_size].T, "gate", shapes["gate"], theirs)
                p["up"] = put(a[cfg.intermediate_size:].T, "up", shapes["up"], theirs)
                continue
            if ours in _OPTIONAL and theirs not in keys:
                continue
            a = w.get(theirs)
            p[ours] = put(_to_ours(ours, a), ours, shapes[ours], theirs)
        layers.append(p)
    V, D = cfg.vocab_size, cfg.hidden_size
    embed_name = pre + ("embeddings.weight" if pre + "embeddings.weight" in keys else "embed_tokens.weight")
    final = pre + FINAL_NORM[cfg.family]
    params = {"embed": put(w.get(embed_name), "embed", (V, D), embed_name),
              "final_norm": put(w.get(final), "final_norm", (D,), final), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = put(w.get("lm_head.weight"), "lm_head", (V, D), "lm_head.weight")
    if not stacked:
        return params
    from hybrid_jax.stack import stack_layers
    host = stack_layers(params, cfg, xp=np)
    del params, layers  # the host list form goes; only the stacked copy is transferred
    return jax.tree.map(jnp.asarray, host)


def load_pretrained(path: str, dtype="auto", stacked: bool = False) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face checkpoint directory.

    dtype: "auto" (default) takes the checkpoint config's torch_dtype (bfloat16 for the released models, float32
    when it names none); "float32", "bfloat16", "float16" override it. A_log, D and dt_bias stay float32.
    stacked: params in hybrid_jax.stack's stacked form (built on the host; the device never holds both forms)
    instead of the list form {"layers": [...]}.
    Raises FileNotFoundError, ConfigError or CheckpointError with a message naming what is wrong."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg = from_hf(read_config(path))
    return cfg, load_params(path, cfg, dtype, stacked=stacked)


__all__ = ["DTYPE_CHOICES", "FLOAT32_PARAMS", "CheckpointError", "ConfigError", "load_pretrained", "load_params",
           "read_config", "read_raw_tensor", "resolve_dtype", "sublayer_sources", "top_level_names"]
