"""The tensors of a real checkpoint of a config.json dict: their names, shapes and initial values' kind, in the
order the writer stores them (hybrid_jax/random_checkpoint.py).

* ``nemotron_h``: ``backbone.{embeddings, layers.N.norm, layers.N.mixer.*, norm_f}`` plus ``lm_head``; MoE layers
  with ``mixer.gate.weight`` and ``mixer.gate.e_score_correction_bias`` (float32), one
  ``mixer.experts.{e}.{up,down}_proj.weight`` per expert, ``mixer.shared_experts.*`` and, with
  ``moe_latent_size``, ``mixer.fc{1,2}_latent_proj.*``;
* ``granitemoehybrid``: ``model.*`` with ``layers.N.{input_layernorm, post_attention_layernorm,
  mamba.*|self_attn.*, shared_mlp.*}`` and, with ``num_local_experts`` > 0,
  ``block_sparse_moe.{input_linear, output_linear, router.layer}.weight``; no ``lm_head`` when tied;
* ``bamba``: ``model.*`` with ``layers.N.{input_layernorm, pre_ff_layernorm, mamba.*|self_attn.*,
  feed_forward.*}``, ``final_layernorm``, plus ``lm_head`` unless tied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hybrid_jax.checkpoint_writer.arch import UnsupportedConfigError, check_supported, layer_kinds
from hybrid_jax.weights_file import STORAGE_DTYPES, storage_dtype


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

    def storage(self, dtype: str) -> str:
        """The dtype this tensor is stored in, in a checkpoint of `dtype` (a STORAGE_DTYPES name)."""
        return self.dtype or dtype

    def nbytes(self, dtype: str) -> int:
        """Bytes of this tensor in a checkpoint of `dtype` (a STORAGE_DTYPES name)."""
        return self.numel * np.dtype(STORAGE_DTYPES[self.storage(dtype)]).itemsize


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


def _nemotron_specs(config: dict, kinds: list[str], m: dict, conv_std: float) -> list[TensorSpec]:
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    specs = [TensorSpec("backbone.embeddings.weight", (v, h))]
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
    return specs


def _granite_specs(config: dict, kinds: list[str], m: dict, conv_std: float) -> list[TensorSpec]:
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    specs = [TensorSpec("model.embed_tokens.weight", (v, h))]
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
    return specs


def _bamba_specs(config: dict, kinds: list[str], m: dict, conv_std: float) -> list[TensorSpec]:
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    specs = [TensorSpec("model.embed_tokens.weight", (v, h))]
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
    return specs


_FAMILY_SPECS = {"nemotron_h": _nemotron_specs, "granitemoehybrid": _granite_specs, "bamba": _bamba_specs}


def plan_checkpoint(config: dict) -> list[TensorSpec]:
    """Ordered list of every tensor the real checkpoint of ``config`` stores (name, shape, init)."""
    mt = check_supported(config)
    m = _mamba_dims(config, mt)
    conv_std = 1.0 / math.sqrt(m["kernel"])  # keeps the depthwise conv roughly variance-preserving
    specs = _FAMILY_SPECS[mt](config, layer_kinds(config), m, conv_std)
    if not bool(config.get("tie_word_embeddings", False)):
        specs.append(TensorSpec("lm_head.weight", (int(config["vocab_size"]), int(config["hidden_size"]))))
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "duplicate tensor names in plan"
    return specs


def checkpoint_nbytes(config: dict, dtype: str = "bfloat16") -> int:
    """Total tensor bytes of the checkpoint (the index's ``metadata.total_size``)."""
    dtype = storage_dtype(dtype)
    return sum(s.nbytes(dtype) for s in plan_checkpoint(config))
