"""Write random-weight checkpoints in the exact on-disk layout of the real Hugging Face checkpoints.

Supported architectures:

* ``nemotron_h`` (NemotronHForCausalLM: Nemotron-H, Nemotron Nano 2, Nemotron 3 with MoE "E" layers) --
  tensors under ``backbone.*`` (``embeddings``, ``layers.N.norm``, ``layers.N.mixer.*``, ``norm_f``) plus
  ``lm_head``, as the released checkpoints store them (transformers renames ``backbone.`` to ``model.`` on
  load). MoE layers: ``mixer.gate.weight`` and ``mixer.gate.e_score_correction_bias`` (both float32, as transformers
  keeps and saves them), one ``mixer.experts.{e}.{up,down}_proj.weight`` per expert (transformers merges them
  into 3-D tensors on load and splits them again on save), ``mixer.shared_experts.*`` and, with
  ``moe_latent_size``, ``mixer.fc{1,2}_latent_proj.*``.
* ``granitemoehybrid`` (GraniteMoeHybridForCausalLM: Granite 4.0-H dense and MoE) -- ``model.*`` with
  ``layers.N.{input_layernorm,post_attention_layernorm,mamba.*|self_attn.*,shared_mlp.*}`` and, with
  ``num_local_experts`` > 0, ``block_sparse_moe.{input_linear,output_linear,router.layer}.weight``
  (experts fused: [E, 2I, D], [E, D, I]); no ``lm_head`` when ``tie_word_embeddings``.
* ``bamba`` (BambaForCausalLM) -- ``model.*`` with ``layers.N.{input_layernorm,pre_ff_layernorm,
  mamba.*|self_attn.*,feed_forward.*}``, ``final_layernorm``, plus ``lm_head`` unless tied.

Tensors are generated one at a time, in chunks, in float32 with numpy and cast on the fly, and
streamed straight into the safetensors files, so memory stays bounded by the chunk size whatever
the model size. Checkpoints below ``max_shard_bytes`` go to one ``model.safetensors``; larger
ones to ``model-0000K-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.

Each tensor's values depend only on (seed, tensor name), so a truncated model shares the values
of the layers it keeps, and re-running with the same seed gives byte-identical files.

This module deliberately imports nothing else from ``hybrid_jax``.

CLI::

    python -m hybrid_jax.random_checkpoint --config configs/models/X.json --out DIR \
        [--dtype bfloat16|float32|float16] [--seed 0] [--num-layers N [--cover-kinds]] \
        [--init-std 0.02] [--max-shard-size 2GB]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import struct
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DEFAULT_MAX_SHARD_BYTES",
    "UnsupportedConfigError",
    "TensorSpec",
    "load_config",
    "layer_kinds",
    "truncate_config",
    "check_supported",
    "plan_checkpoint",
    "checkpoint_nbytes",
    "tensor_values",
    "write_random_checkpoint",
    "main",
]

SUPPORTED_MODEL_TYPES = ("nemotron_h", "granitemoehybrid", "bamba")
DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3  # "2GB" in the Hugging Face sense
TOKENIZER_MARKER = "byte_tokenizer.json"
BYTE_VOCAB = 264  # the ids of serving's byte-level tokenizer (serving/tokenizer.py ByteTokenizer)
_CHUNK_ELEMS = 1 << 22  # values generated per numpy call (16 MiB of float32)

# safetensors dtype tag, bytes per element, numpy dtype of the stored bits
_DTYPES = {
    "bfloat16": ("BF16", 2, np.uint16),
    "float32": ("F32", 4, np.float32),
    "float16": ("F16", 2, np.float16),
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
                  "half": "float16", "float": "float32"}


class UnsupportedConfigError(ValueError):
    """The config is of an architecture this writer does not produce (unknown model_type, ...)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the planned checkpoint.

    ``init`` is one of: ``normal`` (N(0, std)), ``ones``, ``zeros``, ``a_log`` (log(1..n)),
    ``dt_bias`` (inverse softplus of log-uniform dt in [time_step_min, time_step_max]).
    ``std`` is None for ``normal`` tensors that use the writer's ``init_std``. ``dtype`` is None for
    tensors stored in the checkpoint's dtype, or a fixed storage dtype ("float32").
    """

    name: str
    shape: tuple[int, ...]
    init: str = "normal"
    std: float | None = None
    dtype: str | None = None

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


# ----------------------------------------------------------------------------------------------
# config helpers


def load_config(path: str) -> dict:
    """Read a config.json (a file, or a directory holding one). ``Infinity`` is accepted."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


_NEMOTRON_CHAR = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_KIND_CHAR = {v: k for k, v in _NEMOTRON_CHAR.items()}
# spellings found in saved configs (remote code: mamba/attention; transformers 5: linear/full_attention)
_KIND_ALIASES = {"mamba": "mamba", "m": "mamba", "linear_attention": "mamba", "mamba2": "mamba",
                 "attention": "attention", "full_attention": "attention", "attn": "attention",
                 "mlp": "mlp", "moe": "moe"}


def _norm_kind(k: str) -> str:
    try:
        return _KIND_ALIASES[str(k).lower()]
    except KeyError:
        raise UnsupportedConfigError(f"unknown layer type {k!r}") from None


def _model_type(config: dict) -> str:
    mt = config.get("model_type")
    if mt is None:
        arch = (config.get("architectures") or [""])[0]
        mt = {"NemotronHForCausalLM": "nemotron_h", "GraniteMoeHybridForCausalLM": "granitemoehybrid",
              "BambaForCausalLM": "bamba"}.get(arch)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return mt


def layer_kinds(config: dict) -> list[str]:
    """Per-layer kind: ``mamba``, ``attention``, ``mlp`` (NemotronH only) or ``moe``.

    Granite/Bamba layers are hybrid blocks (mixer + MLP); their kind names the mixer.
    """
    mt = _model_type(config)
    if mt == "nemotron_h":
        pattern = config.get("hybrid_override_pattern")
        if pattern is not None:
            try:
                return [_NEMOTRON_CHAR[c] for c in pattern]
            except KeyError as e:
                raise UnsupportedConfigError(f"unknown hybrid_override_pattern character {e.args[0]!r}") from None
        lst = config.get("layers_block_type") or config.get("layer_types")
        if lst is None:
            raise UnsupportedConfigError("nemotron_h config has neither hybrid_override_pattern nor layers_block_type")
        return [_norm_kind(k) for k in lst]
    if mt == "granitemoehybrid":
        lst = config.get("layer_types") or config.get("layers_block_type")
        if lst is None:
            return ["mamba"] * int(config["num_hidden_layers"])
        return [_norm_kind(k) for k in lst]
    # bamba
    n = int(config["num_hidden_layers"])
    idx = config.get("attn_layer_indices")
    if idx is None and config.get("layers_block_type"):
        return [_norm_kind(k) for k in config["layers_block_type"]]
    idx = set(idx or [])
    return ["attention" if i in idx else "mamba" for i in range(n)]


def _set_layer_kinds(config: dict, kinds: list[str]) -> dict:
    """Return a copy of ``config`` whose layer list is ``kinds`` (every spelling present is updated)."""
    cfg = copy.deepcopy(config)
    mt = _model_type(cfg)
    n = len(kinds)
    cfg["num_hidden_layers"] = n
    if mt == "nemotron_h":
        if "hybrid_override_pattern" in cfg or not any(k in cfg for k in ("layers_block_type", "layer_types")):
            cfg["hybrid_override_pattern"] = "".join(_KIND_CHAR[k] for k in kinds)
        for key in ("layers_block_type", "layer_types"):
            if key in cfg and cfg[key] is not None:
                full = any(str(x).endswith("_attention") for x in cfg[key])
                cfg[key] = [({"mamba": "linear_attention", "attention": "full_attention"}.get(k, k) if full else k)
                            for k in kinds]
    elif mt == "granitemoehybrid":
        for key in ("layer_types", "layers_block_type"):
            if key in cfg and cfg[key] is not None:
                cfg[key] = list(kinds)
        if "layer_types" not in cfg and "layers_block_type" not in cfg:
            cfg["layer_types"] = list(kinds)
    else:
        cfg["attn_layer_indices"] = [i for i, k in enumerate(kinds) if k == "attention"]
        if cfg.get("layers_block_type"):
            cfg["layers_block_type"] = list(kinds)
    return cfg


def truncate_config(config: dict, num_layers: int, cover_kinds: bool = False) -> dict:
    """Keep the first ``num_layers`` layers (config fields updated consistently).

    With ``cover_kinds`` every layer kind of the full model still appears: kinds missing from the
    prefix replace the last layers of the prefix (in order of first appearance in the full model).
    """
    kinds = layer_kinds(config)
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    if num_layers >= len(kinds):
        return copy.deepcopy(config)
    head = kinds[:num_layers]
    if cover_kinds:
        order: list[str] = []
        for k in kinds:
            if k not in order:
                order.append(k)
        if len(order) > num_layers:
            raise ValueError(f"{num_layers} layers cannot cover the {len(order)} layer kinds {order}")
        for k in (k for k in order if k not in head):
            # overwrite the last layer whose kind is duplicated in the prefix (one always exists)
            j = next(j for j in reversed(range(num_layers)) if head.count(head[j]) > 1)
            head[j] = k
    return _set_layer_kinds(config, head)


def check_supported(config: dict) -> str:
    """Raise UnsupportedConfigError for configs this writer cannot produce; return the model_type."""
    mt = _model_type(config)
    kinds = layer_kinds(config)
    if "moe" in kinds:
        if mt != "nemotron_h":
            raise UnsupportedConfigError(f"{mt} has no standalone 'moe' layers (Granite: num_local_experts)")
        for key in ("n_routed_experts", "moe_intermediate_size"):
            if not int(config.get(key) or 0):
                raise UnsupportedConfigError(f"nemotron_h MoE layers need a positive {key!r}")
    if mt == "granitemoehybrid" and int(config.get("num_local_experts") or 0) > 0:
        if not int(config.get("intermediate_size") or 0):
            raise UnsupportedConfigError("granitemoehybrid MoE layers need a positive 'intermediate_size'")
    if mt == "nemotron_h" and int(config.get("num_hidden_layers", len(kinds))) != len(kinds):
        raise UnsupportedConfigError(
            f"num_hidden_layers={config['num_hidden_layers']} does not match the {len(kinds)}-layer pattern")
    if mt != "nemotron_h" and "mlp" in kinds:
        raise UnsupportedConfigError(f"{mt} has no standalone 'mlp' layers")
    return mt


# ----------------------------------------------------------------------------------------------
# planning


def _head_dim(config: dict) -> int:
    for key in ("head_dim", "attention_head_dim"):
        if config.get(key):
            return int(config[key])
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def _mamba_dims(config: dict, mt: str) -> dict:
    h = int(config["hidden_size"])
    if mt == "nemotron_h":
        nh = int(config["mamba_num_heads"])
        hd = int(config["mamba_head_dim"])
        d_inner = nh * hd
        g = int(config.get("n_groups", config.get("mamba_n_groups", 8)))
        n = int(config.get("ssm_state_size", 128))
        k = int(config.get("conv_kernel", config.get("mamba_d_conv", 4)))
        conv_bias = bool(config.get("use_conv_bias", config.get("mamba_conv_bias", True)))
        proj_bias = bool(config.get("use_bias", False))
    else:
        nh = int(config.get("mamba_n_heads", 128))
        d_inner = int(config.get("mamba_expand", 2)) * h
        hd = config.get("mamba_d_head", "auto")
        hd = d_inner // nh if hd in (None, "auto") else int(hd)
        if hd * nh != d_inner:
            raise UnsupportedConfigError(f"mamba_n_heads*mamba_d_head={nh * hd} != mamba_expand*hidden_size={d_inner}")
        g = int(config.get("mamba_n_groups", 1))
        n = int(config.get("mamba_d_state", 256))
        k = int(config.get("mamba_d_conv", 4))
        conv_bias = bool(config.get("mamba_conv_bias", True))
        proj_bias = bool(config.get("mamba_proj_bias", False))
    conv_dim = d_inner + 2 * g * n
    return {"n_heads": nh, "d_inner": d_inner, "conv_dim": conv_dim, "kernel": k,
            "in_proj": d_inner + conv_dim + nh, "conv_bias": conv_bias, "proj_bias": proj_bias}


def _mamba_specs(pre: str, h: int, m: dict, conv_std: float) -> list[TensorSpec]:
    out = [TensorSpec(pre + "in_proj.weight", (m["in_proj"], h))]
    if m["proj_bias"]:
        out.append(TensorSpec(pre + "in_proj.bias", (m["in_proj"],), "zeros"))
    out.append(TensorSpec(pre + "conv1d.weight", (m["conv_dim"], 1, m["kernel"]), "normal", conv_std))
    if m["conv_bias"]:
        out.append(TensorSpec(pre + "conv1d.bias", (m["conv_dim"],)))
    out += [
        TensorSpec(pre + "dt_bias", (m["n_heads"],), "dt_bias"),
        TensorSpec(pre + "A_log", (m["n_heads"],), "a_log"),
        TensorSpec(pre + "D", (m["n_heads"],), "ones"),
        TensorSpec(pre + "norm.weight", (m["d_inner"],), "ones"),
        TensorSpec(pre + "out_proj.weight", (h, m["d_inner"])),
    ]
    if m["proj_bias"]:
        out.append(TensorSpec(pre + "out_proj.bias", (h,), "zeros"))
    return out


def _granite_bamba_mixer_specs(pre, kind, h, m, conv_std, config, attn_bias) -> list:
    """Input norm plus the Mamba or attention mixer of a Granite / Bamba decoder layer (same names in both)."""
    specs = [TensorSpec(pre + "input_layernorm.weight", (h,), "ones")]
    if kind == "mamba":
        return specs + _mamba_specs(pre + "mamba.", h, m, conv_std)
    return specs + _attn_specs(pre + "self_attn.", config, attn_bias)


def _attn_specs(pre: str, config: dict, bias: bool) -> list[TensorSpec]:
    h = int(config["hidden_size"])
    nq = int(config["num_attention_heads"])
    nkv = int(config.get("num_key_value_heads") or nq)
    hd = _head_dim(config)
    out = []
    for proj, (o, i) in (("q_proj", (nq * hd, h)), ("k_proj", (nkv * hd, h)), ("v_proj", (nkv * hd, h)),
                         ("o_proj", (h, nq * hd))):
        out.append(TensorSpec(f"{pre}{proj}.weight", (o, i)))
        if bias:
            out.append(TensorSpec(f"{pre}{proj}.bias", (o,), "zeros"))
    return out


def _nemotron_moe_specs(mix: str, h: int, config: dict) -> list[TensorSpec]:
    """A NemotronH MoE mixer (transformers NemotronHMoE), in the on-disk per-expert layout."""
    e = int(config["n_routed_experts"])
    inter = int(config["moe_intermediate_size"])
    shared = int(config.get("moe_shared_expert_intermediate_size") or 0)
    latent = int(config.get("moe_latent_size") or 0)
    width = latent or h
    bias = bool(config.get("mlp_bias", False))
    specs = [TensorSpec(mix + "gate.weight", (e, h), dtype="float32"),
             TensorSpec(mix + "gate.e_score_correction_bias", (e,), "zeros", dtype="float32")]
    for k in range(e):
        specs.append(TensorSpec(f"{mix}experts.{k}.up_proj.weight", (inter, width)))
        specs.append(TensorSpec(f"{mix}experts.{k}.down_proj.weight", (width, inter)))
    projections = [("shared_experts.up_proj", shared, h), ("shared_experts.down_proj", h, shared)]
    if latent:
        projections += [("fc1_latent_proj", latent, h), ("fc2_latent_proj", h, latent)]
    for name, out_dim, in_dim in projections:
        specs.append(TensorSpec(f"{mix}{name}.weight", (out_dim, in_dim)))
        if bias:
            specs.append(TensorSpec(f"{mix}{name}.bias", (out_dim,), "zeros"))
    return specs


def _granite_moe_specs(pre: str, h: int, config: dict) -> list[TensorSpec]:
    """Granite's routed experts (fused over experts, as the checkpoints store them) and router."""
    e, inter = int(config["num_local_experts"]), int(config["intermediate_size"])
    moe = pre + "block_sparse_moe."
    return [TensorSpec(moe + "input_linear.weight", (e, 2 * inter, h)),
            TensorSpec(moe + "output_linear.weight", (e, h, inter)),
            TensorSpec(moe + "router.layer.weight", (e, h))]


def plan_checkpoint(config: dict) -> list[TensorSpec]:
    """Ordered list of every tensor the real checkpoint of ``config`` stores (name, shape, init)."""
    mt = check_supported(config)
    kinds = layer_kinds(config)
    h = int(config["hidden_size"])
    v = int(config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings", False))
    m = _mamba_dims(config, mt)
    conv_std = 1.0 / math.sqrt(m["kernel"])  # keeps the depthwise conv roughly variance-preserving
    specs: list[TensorSpec] = []
    if mt == "nemotron_h":
        specs.append(TensorSpec("backbone.embeddings.weight", (v, h)))
        inter = int(config["intermediate_size"])
        mlp_bias = bool(config.get("mlp_bias", False))
        attn_bias = bool(config.get("attention_bias", False))
        for i, kind in enumerate(kinds):
            pre = f"backbone.layers.{i}."
            specs.append(TensorSpec(pre + "norm.weight", (h,), "ones"))
            mix = pre + "mixer."
            if kind == "mamba":
                specs += _mamba_specs(mix, h, m, conv_std)
            elif kind == "attention":
                specs += _attn_specs(mix, config, attn_bias)
            elif kind == "moe":
                specs += _nemotron_moe_specs(mix, h, config)
            else:  # mlp
                specs.append(TensorSpec(mix + "up_proj.weight", (inter, h)))
                if mlp_bias:
                    specs.append(TensorSpec(mix + "up_proj.bias", (inter,), "zeros"))
                specs.append(TensorSpec(mix + "down_proj.weight", (h, inter)))
                if mlp_bias:
                    specs.append(TensorSpec(mix + "down_proj.bias", (h,), "zeros"))
        specs.append(TensorSpec("backbone.norm_f.weight", (h,), "ones"))
    elif mt == "granitemoehybrid":
        specs.append(TensorSpec("model.embed_tokens.weight", (v, h)))
        shared = int(config.get("shared_intermediate_size") or config["intermediate_size"])
        attn_bias = bool(config.get("attention_bias", False))
        for i, kind in enumerate(kinds):
            pre = f"model.layers.{i}."
            specs += _granite_bamba_mixer_specs(pre, kind, h, m, conv_std, config, attn_bias)
            if int(config.get("num_local_experts") or 0) > 0:
                specs += _granite_moe_specs(pre, h, config)
            specs.append(TensorSpec(pre + "shared_mlp.input_linear.weight", (2 * shared, h)))
            specs.append(TensorSpec(pre + "shared_mlp.output_linear.weight", (h, shared)))
            specs.append(TensorSpec(pre + "post_attention_layernorm.weight", (h,), "ones"))
        specs.append(TensorSpec("model.norm.weight", (h,), "ones"))
    else:  # bamba
        specs.append(TensorSpec("model.embed_tokens.weight", (v, h)))
        inter = int(config["intermediate_size"])
        mlp_bias = bool(config.get("mlp_bias", False))
        attn_bias = bool(config.get("attention_bias", False))
        for i, kind in enumerate(kinds):
            pre = f"model.layers.{i}."
            specs += _granite_bamba_mixer_specs(pre, kind, h, m, conv_std, config, attn_bias)
            specs.append(TensorSpec(pre + "pre_ff_layernorm.weight", (h,), "ones"))
            for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
                specs.append(TensorSpec(f"{pre}feed_forward.{proj}.weight", shape))
                if mlp_bias:
                    specs.append(TensorSpec(f"{pre}feed_forward.{proj}.bias", (shape[0],), "zeros"))
        specs.append(TensorSpec("model.final_layernorm.weight", (h,), "ones"))
    if not tied:
        specs.append(TensorSpec("lm_head.weight", (v, h)))
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "duplicate tensor names in plan"
    return specs


def _canon_dtype(dtype: str) -> str:
    d = str(dtype).lower().replace("torch.", "")
    d = _DTYPE_ALIASES.get(d, d)
    if d not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use one of {', '.join(_DTYPES)})")
    return d


def _spec_itemsize(spec: TensorSpec, dtype: str) -> int:
    return _DTYPES[spec.dtype or dtype][1]


def checkpoint_nbytes(config: dict, dtype: str = "bfloat16") -> int:
    """Total tensor bytes of the checkpoint (the index's ``metadata.total_size``)."""
    dtype = _canon_dtype(dtype)
    return sum(s.numel * _spec_itemsize(s, dtype) for s in plan_checkpoint(config))


# ----------------------------------------------------------------------------------------------
# value generation


def _rng(seed: int, name: str) -> np.random.Generator:
    """Generator for one tensor: depends only on (seed, name). SFC64 is the fastest numpy bit generator."""
    digest = hashlib.sha256(name.encode()).digest()
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest[:8], "little")])
    return np.random.Generator(np.random.SFC64(ss))


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even (NaNs stay NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


try:  # optional fast path (a jax dependency); bit-identical to _to_bf16_bits
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover
    _ml_dtypes = None


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        if _ml_dtypes is not None:
            return np.ascontiguousarray(x, dtype=np.float32).astype(_ml_dtypes.bfloat16).tobytes()
        return _to_bf16_bits(x).tobytes()
    return np.ascontiguousarray(x, dtype=_DTYPES[dtype][2]).tobytes()


def _dt_values(n: int, rng: np.random.Generator, config: dict) -> np.ndarray:
    lo = float(config.get("time_step_min", config.get("mamba_dt_min", 0.001)))
    hi = float(config.get("time_step_max", config.get("mamba_dt_max", 0.1)))
    floor = float(config.get("time_step_floor", config.get("mamba_dt_init_floor", 1e-4)))
    u = rng.random(n)
    dt = np.exp(u * (math.log(hi) - math.log(lo)) + math.log(lo))
    dt = np.maximum(dt, floor)
    return (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # inverse softplus


def _chunks(spec: TensorSpec, seed: int, init_std: float, config: dict):
    """Yield float32 chunks (flattened, C order) of the tensor's values."""
    n = spec.numel
    if spec.init == "ones":
        yield np.ones(n, np.float32)
    elif spec.init == "zeros":
        yield np.zeros(n, np.float32)
    elif spec.init == "a_log":
        yield np.log(np.arange(1, n + 1, dtype=np.float64)).astype(np.float32)
    elif spec.init == "dt_bias":
        yield _dt_values(n, _rng(seed, spec.name), config)
    elif spec.init == "normal":
        std = np.float32(init_std if spec.std is None else spec.std)
        rng = _rng(seed, spec.name)
        done = 0
        while done < n:
            m = min(_CHUNK_ELEMS, n - done)
            chunk = rng.standard_normal(m, dtype=np.float32)
            chunk *= std
            yield chunk
            done += m
    else:
        raise ValueError(f"unknown init {spec.init!r}")


def tensor_values(spec: TensorSpec, seed: int = 0, init_std: float = 0.02, config: dict | None = None) -> np.ndarray:
    """The float32 values (before the cast to the storage dtype) that the writer stores for ``spec``."""
    flat = np.concatenate(list(_chunks(spec, seed, init_std, config or {})))
    return flat.reshape(spec.shape)


# ----------------------------------------------------------------------------------------------
# safetensors writing


def _shard_plan(specs: list[TensorSpec], dtype: str, max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nb = s.numel * _spec_itemsize(s, dtype)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nb
    return shards


def _write_safetensors(path: str, specs: list[TensorSpec], dtype: str, seed: int, init_std: float,
                       config: dict) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        tag, itemsize, _ = _DTYPES[s.dtype or dtype]
        nb = s.numel * itemsize
        header[s.name] = {"dtype": tag, "shape": list(s.shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)  # data starts 8-byte aligned
    tmp = path + ".partial"
    # file writes release the GIL: a one-thread writer overlaps disk I/O with value generation
    with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=1) as io:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        pending: deque = deque()
        for s in specs:
            written = 0
            for chunk in _chunks(s, seed, init_std, config):
                b = _encode(chunk, s.dtype or dtype)
                written += len(b)
                pending.append(io.submit(f.write, b))
                while len(pending) > 2:  # bounded memory: at most a few chunks in flight
                    pending.popleft().result()
            if written != s.numel * _spec_itemsize(s, dtype):
                raise RuntimeError(f"internal error: wrote {written} bytes for {s.name}")
        while pending:
            pending.popleft().result()
    os.replace(tmp, path)


def _parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    t = s.strip().upper()
    for unit, mult in (("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 1000**3), ("MB", 1000**2),
                       ("KB", 1000), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def write_random_checkpoint(config: dict, out_dir, dtype: str = "bfloat16", seed: int = 0, init_std: float = 0.02,
                            *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, num_layers: int | None = None,
                            cover_kinds: bool = False) -> str:
    """Write ``out_dir/config.json`` and random weights in the real checkpoint layout, and (unless out_dir has a
    tokenizer.json, or the vocabulary is smaller) a ``byte_tokenizer.json`` marker: serving's byte-level
    tokenizer, ids 0-263, so the checkpoint serves as written; return ``out_dir``.

    ``config`` is a config.json dict (not modified). ``dtype`` is the storage dtype (bfloat16,
    float32 or float16; also recorded as ``torch_dtype`` in the written config). Tensors
    totalling more than ``max_shard_bytes`` are split over ``model-0000K-of-0000N.safetensors``
    with ``model.safetensors.index.json``; otherwise a single ``model.safetensors`` is written.
    ``num_layers`` (with ``cover_kinds``) truncates the layer list first, see truncate_config.
    Raises UnsupportedConfigError for unknown architectures or MoE configs missing their sizes.
    """
    dtype = _canon_dtype(dtype)
    cfg = copy.deepcopy(config)
    if num_layers is not None:
        cfg = truncate_config(cfg, num_layers, cover_kinds=cover_kinds)
    specs = plan_checkpoint(cfg)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for fn in os.listdir(out_dir):  # stale weights from an earlier run would confuse loaders
        if fn == "model.safetensors" or fn == "model.safetensors.index.json" or (
                fn.startswith("model-") and fn.endswith(".safetensors")):
            os.remove(os.path.join(out_dir, fn))

    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    if int(cfg.get("vocab_size", 0)) >= BYTE_VOCAB and not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        with open(os.path.join(out_dir, TOKENIZER_MARKER), "w") as f:  # serving reads its byte-level tokenizer
            f.write('{"type": "byte"}\n')

    total = sum(s.numel * _spec_itemsize(s, dtype) for s in specs)
    shards = _shard_plan(specs, dtype, max_shard_bytes)
    if len(shards) == 1:
        _write_safetensors(os.path.join(out_dir, "model.safetensors"), specs, dtype, seed, init_std, cfg)
        return out_dir
    weight_map: dict[str, str] = {}
    n = len(shards)
    for k, shard in enumerate(shards, start=1):
        fn = f"model-{k:05d}-of-{n:05d}.safetensors"
        _write_safetensors(os.path.join(out_dir, fn), shard, dtype, seed, init_std, cfg)
        for s in shard:
            weight_map[s.name] = fn
    index = {"metadata": {"total_parameters": sum(s.numel for s in specs), "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return out_dir


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_jax.random_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config.json (file or directory) of the architecture")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="storage dtype (default bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers (quick tests)")
    p.add_argument("--cover-kinds", action="store_true",
                   help="with --num-layers: make sure every layer kind of the full model is kept")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the normal init of matrices/embeddings")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES),
                   help="shard size limit, e.g. 2GB, 500MB, 1GiB or bytes (default 2GB)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
        if a.num_layers is not None:
            cfg = truncate_config(cfg, a.num_layers, cover_kinds=a.cover_kinds)
        specs = plan_checkpoint(cfg)
    except (UnsupportedConfigError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nparams = sum(s.numel for s in specs)
    nbytes = sum(s.numel * _spec_itemsize(s, a.dtype) for s in specs)
    print(f"writing {len(specs)} tensors, {nparams / 1e6:.1f}M params, {nbytes / 1e9:.2f} GB ({a.dtype}) to {a.out}",
          file=sys.stderr)
    write_random_checkpoint(cfg, a.out, dtype=a.dtype, seed=a.seed, init_std=a.init_std,
                            max_shard_bytes=_parse_size(a.max_shard_size))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
