"""Numerical oracle built on Hugging Face transformers (5.23) for the hybrid JAX engine.

Everything is built from configs in code; nothing is downloaded.

* ``make_tiny_checkpoint`` writes a tiny float32 checkpoint with a deliberately
  "loud" random init (HF's own init gives near-zero logits, which would let
  many bugs through), optionally rewritten into the legacy on-disk forms that
  real checkpoints use (``backbone.*`` keys, ``hybrid_override_pattern``,
  ``"mamba"``/``"attention"`` layer names, bare ``Infinity`` in JSON).
* ``load_reference`` reloads it with transformers and removes the one known
  prefill/decode asymmetry (see ``_patch_time_step_limit``).
* ``reference_logits`` / ``reference_greedy`` are the oracle outputs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch

FAMILIES = ("nemotron_h", "granitemoehybrid", "bamba")

# Shared tiny shapes. mamba: 8 heads x 16 = 128 = 2 * hidden (the expand the
# Granite/Bamba configs derive the inner size from); chunk 16 so that a
# 40-token sequence crosses two chunk boundaries and ends mid-chunk.
VOCAB = 320
HIDDEN = 64
N_HEADS, N_KV_HEADS, HEAD_DIM = 4, 2, 16
MAMBA_HEADS, MAMBA_HEAD_DIM, N_GROUPS, D_STATE, D_CONV = 8, 16, 2, 16, 4
CHUNK = 16
INTERMEDIATE = 128
# Tiny mixture-of-experts shapes (NemotronH "E" layers; Granite with num_local_experts > 0 uses INTERMEDIATE for
# its experts and shared MLP unless overridden).
MOE_NEMOTRON = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    moe_shared_expert_intermediate_size=48)

_INF = float("inf")
# pattern character -> transformers 5.23 layer-type name (the legacy names
# "mamba"/"attention" are remapped to these by remap_legacy_layer_types).
_CHAR_TO_TYPE = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_TYPE_TO_CHAR = {v: k for k, v in _CHAR_TO_TYPE.items()}
_LEGACY_NAMES = {"mamba": "linear_attention", "attention": "full_attention"}
_TO_LEGACY_NAMES = {v: k for k, v in _LEGACY_NAMES.items()}


def _layer_types(layer_pattern: str | Sequence[str]) -> list[str]:
    """Accept "M*M-M" or ["mamba", "attention", ...] (old or new names)."""
    if isinstance(layer_pattern, str):
        return [_CHAR_TO_TYPE[c] for c in layer_pattern]
    return [_LEGACY_NAMES.get(t, t) for t in layer_pattern]


def _pattern(types: Sequence[str]) -> str:
    return "".join(_TYPE_TO_CHAR[t] for t in types)


def _config(family: str, types: list[str], overrides: dict):
    from transformers import BambaConfig, GraniteMoeHybridConfig, NemotronHConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )
    if family == "nemotron_h":
        kw = dict(
            common,
            layers_block_type=types,
            mamba_num_heads=MAMBA_HEADS,
            mamba_head_dim=MAMBA_HEAD_DIM,
            n_groups=N_GROUPS,
            ssm_state_size=D_STATE,
            conv_kernel=D_CONV,
            chunk_size=CHUNK,
            mlp_hidden_act="relu2",
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=False,
            # transformers ignores this (the mixer hard-codes
            # (time_step_min, inf)); real checkpoints write (0, inf).
            time_step_limit=(0.0, _INF),
        )
        if "moe" in types:
            kw.update(MOE_NEMOTRON)
        kw.update(overrides)
        return NemotronHConfig(**kw)

    if "-" in _pattern(types) or "E" in _pattern(types):
        raise ValueError(f"{family} has no standalone mlp/moe layers: {types}")
    mamba = dict(
        mamba_n_heads=MAMBA_HEADS,
        mamba_d_head=MAMBA_HEAD_DIM,
        mamba_n_groups=N_GROUPS,
        mamba_d_state=D_STATE,
        mamba_d_conv=D_CONV,
        mamba_expand=2,
        mamba_chunk_size=CHUNK,
        time_step_limit=(0.0, _INF),
        hidden_act="silu",
        num_hidden_layers=len(types),
    )
    if family == "granitemoehybrid":
        kw = dict(
            common,
            **mamba,
            layer_types=types,
            num_local_experts=0,  # dense shared MLP only: Granite 4.0-H-Micro
            shared_intermediate_size=INTERMEDIATE,
            embedding_multiplier=2.0,
            attention_multiplier=0.2,
            residual_multiplier=0.5,
            logits_scaling=2.0,
            position_embedding_type="rope",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,  # as in Granite 4.0-H
        )
        kw.update(overrides)
        return GraniteMoeHybridConfig(**kw)
    if family == "bamba":
        kw = dict(
            common,
            **mamba,
            attn_layer_indices=[i for i, t in enumerate(types) if t == "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
        kw.update(overrides)
        return BambaConfig(**kw)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


@torch.no_grad()
def _loud_init_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter so that each one visibly moves the logits.

    HF's init (std 0.02, norms == 1, D == 1, A = 1..H, dt_bias == 1) makes
    logits nearly constant and hides bugs such as a missing norm weight or a
    swapped group order.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(p):
        return torch.randn(p.shape, generator=g, dtype=torch.float64)

    def uniform(p, lo, hi):
        return lo + (hi - lo) * torch.rand(p.shape, generator=g, dtype=torch.float64)

    for name, p in model.named_parameters():  # tied params are yielded once
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            v = torch.log(uniform(p, 1.0, 16.0))
        elif leaf == "dt_bias":
            # inverse softplus of dt ~ U(0.001, 0.1), plus noise; softplus(x) < 1e-3
            # for x < -6.9, so some heads sit below time_step_min and expose clamping.
            v = torch.log(torch.expm1(uniform(p, 0.001, 0.1))) + 0.1 * randn(p)
        elif leaf == "D":
            v = 1.0 + 0.1 * randn(p)
        elif "conv1d" in name:
            v = (0.2 if leaf == "weight" else 0.1) * randn(p)
        elif leaf == "bias":
            v = 0.1 * randn(p)
        elif "norm" in name:  # every RMSNorm weight, incl. the gated one
            v = 1.0 + 0.1 * randn(p)
        else:  # matrices and embeddings
            v = 0.15 * randn(p)
        p.copy_(v.to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # NemotronH router bias: a saved buffer, zero by default
            b.copy_((0.1 * randn(b)).to(b.dtype))


def _dump_json(obj, path: str, bare_inf: bool) -> None:
    def encode(x):
        if isinstance(x, float) and math.isinf(x) and not bare_inf:
            return {"__float__": "Infinity" if x > 0 else "-Infinity"}
        if isinstance(x, dict):
            return {k: encode(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [encode(v) for v in x]
        return x

    with open(path, "w") as f:
        # allow_nan writes a bare `Infinity` token (what json.dumps and older
        # transformers produce; Python and transformers both read it back).
        json.dump(encode(obj), f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")


def _decode_floats(x):
    if isinstance(x, dict):
        if set(x) == {"__float__"}:
            return float(x["__float__"].replace("Infinity", "inf"))
        return {k: _decode_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_floats(v) for v in x]
    return x


def _rename_safetensors_keys(out_dir: str, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    if not any(k.startswith(old) for k in tensors):
        return
    renamed = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def make_tiny_checkpoint(
    family: str,
    out_dir: str | os.PathLike,
    layer_pattern: str | Sequence[str],
    seed: int = 0,
    *,
    legacy_pattern: bool = False,
    backbone_keys: bool | None = None,
    legacy_layer_names: bool = False,
    inf_style: str = "tagged",
    **overrides,
) -> str:
    """Write a tiny random float32 checkpoint of ``family`` to ``out_dir``.

    layer_pattern: "M" mamba, "*" attention, "-" MLP, "E" mixture of experts
        (nemotron_h only; tiny MOE_NEMOTRON shapes unless overridden), as a string, or a list of layer-type names ("mamba"/"attention" or the 5.23
        names "linear_attention"/"full_attention"/"mlp").
    legacy_pattern (nemotron_h): config.json holds ``hybrid_override_pattern``
        (+ ``num_hidden_layers``) instead of ``layers_block_type``, like the
        NVIDIA checkpoints.
    backbone_keys (nemotron_h): save_pretrained in transformers 5.23 already
        writes ``backbone.*`` (it reverses its load-time ``backbone.`` ->
        ``model.`` renaming), as the NVIDIA checkpoints do. None/True keep
        that; False rewrites the keys to ``model.*`` so the loader's support
        for both prefixes is exercised.
    legacy_layer_names (granitemoehybrid): ``layer_types`` uses
        "mamba"/"attention", as the IBM Granite 4.0 checkpoints do.
    inf_style: how ``time_step_limit``'s infinity is written in config.json:
        "tagged" -> {"__float__": "Infinity"} (what transformers 5.x writes),
        "bare"   -> the non-standard JSON token Infinity (older writers),
        "omit"   -> key absent (loader must fall back to the (0, inf) default).
    overrides: any config field (e.g. position_embedding_type="nope"; for a
        Granite MoE: num_local_experts=8, num_experts_per_tok=2).
    """
    from transformers import AutoModelForCausalLM

    out_dir = os.fspath(out_dir)
    types = _layer_types(layer_pattern)
    if (legacy_pattern or backbone_keys is not None) and family != "nemotron_h":
        raise ValueError("legacy_pattern / backbone_keys are nemotron_h options")
    if legacy_layer_names and family != "granitemoehybrid":
        raise ValueError("legacy_layer_names is a granitemoehybrid option")
    if inf_style not in ("tagged", "bare", "omit"):
        raise ValueError(f"inf_style must be tagged, bare or omit, got {inf_style!r}")

    config = _config(family, types, overrides)
    torch.manual_seed(seed)  # from_config's own init; overwritten below anyway
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _loud_init_(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)

    if family == "nemotron_h":
        if backbone_keys is False:
            _rename_safetensors_keys(out_dir, "backbone.", "model.")
        else:  # make the documented default explicit whatever save_pretrained does
            _rename_safetensors_keys(out_dir, "model.", "backbone.")

    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = _decode_floats(json.load(f))
    # Rewrite time_step_limit in the requested on-disk form (or drop it).
    cfg.pop("time_step_limit", None)
    if inf_style != "omit":
        cfg["time_step_limit"] = list(config.time_step_limit)
    if legacy_pattern:
        cfg.pop("layers_block_type", None)
        cfg.pop("layer_types", None)
        cfg["hybrid_override_pattern"] = _pattern(types)
        cfg["num_hidden_layers"] = len(types)
    if legacy_layer_names:
        cfg["layer_types"] = [_TO_LEGACY_NAMES.get(t, t) for t in cfg["layer_types"]]
    _dump_json(cfg, cfg_path, bare_inf=(inf_style == "bare"))
    return out_dir


# --------------------------------------------------------------------------
# Reference model
# --------------------------------------------------------------------------

# Prefill/decode asymmetries in transformers 5.23 (torch path), all families:
# the chunked scan clamps dt = softplus(dt_raw + dt_bias) to the mixer's
# ``time_step_limit``; the one-token ``mamba2_selective_state_update`` never
# clamps. Hence:
# * nemotron_h: the mixer ignores config.time_step_limit and hard-codes
#   (config.time_step_min=0.001, inf), so any dt < 0.001 is clamped in
#   prefill but not in decode. NVIDIA's reference and our engine use (0, inf)
#   -> patched below. Unpatched, the full-forward logits of these checkpoints
#   move by ~4e-4 relative (4x the test tolerance), so the patch matters.
# * granitemoehybrid / bamba: the mixer uses config.time_step_limit (default
#   (0, inf), a no-op since softplus >= 0). Only a finite limit in config.json
#   would create the asymmetry; we refuse such configs rather than guess.
# Other, benign, differences: Bamba builds position_ids as arange(T) ignoring
# the cache (callers must pass them when decoding with a cache); Granite and
# NemotronH offset by cache length. NemotronH attention has no RoPE at all.
def _patch_time_step_limit(model) -> None:
    family = model.config.model_type
    for module in model.modules():
        if not hasattr(module, "time_step_limit") or not hasattr(module, "A_log"):
            continue
        if family == "nemotron_h":
            module.time_step_limit = (0.0, _INF)
        elif module.time_step_limit[0] > 0 or module.time_step_limit[1] != _INF:
            raise NotImplementedError(
                f"{family}: finite time_step_limit {module.time_step_limit} clamps prefill but not decode "
                "in transformers; the oracle does not model it"
            )


def load_reference(out_dir: str | os.PathLike):
    """HF model in float32 / eval / eager attention, with the oracle patch."""
    from transformers import AutoModelForCausalLM

    from transformers import AutoConfig

    kw = {}
    config = AutoConfig.from_pretrained(os.fspath(out_dir))
    if config.model_type == "nemotron_h":
        has_moe = "moe" in config.layers_block_type
    else:
        has_moe = (getattr(config, "num_local_experts", 0) or 0) > 0
    if has_moe:
        kw["experts_implementation"] = "eager"  # the plain per-expert loop of the modeling code
    model = AutoModelForCausalLM.from_pretrained(
        os.fspath(out_dir), dtype=torch.float32, attn_implementation="eager", **kw
    )
    model.eval()
    _patch_time_step_limit(model)
    return model


@torch.no_grad()
def reference_logits(model, tokens_np: np.ndarray) -> np.ndarray:
    """[B, T] int tokens -> float32 [B, T, V] logits, single full forward, no cache."""
    ids = torch.as_tensor(np.asarray(tokens_np), dtype=torch.long)
    b, t = ids.shape
    pos = torch.arange(t).unsqueeze(0).expand(b, t)
    out = model(input_ids=ids, position_ids=pos, use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def reference_greedy(
    model, prompt_ids: Sequence[int], n_new: int = 32, *, use_cache: bool = False, return_margins: bool = False
):
    """Greedy continuation of ``prompt_ids`` (new tokens only).

    Default: a full forward over the whole sequence per step (no cache), which
    cannot disagree with ``reference_logits``. ``use_cache=True`` runs HF's
    prefill + one-token decode path instead (used to check the oracle patch).
    With ``return_margins`` also returns the top1 - top2 logit gap per step, so
    that a token mismatch can be told apart from a near tie.
    """
    seq = [int(t) for t in prompt_ids]
    new, margins = [], []
    cache = None
    for step in range(n_new):
        if use_cache:
            if step == 0:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                ids, start = seq, 0
            else:
                ids, start = seq[-1:], len(seq) - 1
            pos = torch.arange(start, start + len(ids)).unsqueeze(0)
            out = model(
                input_ids=torch.tensor([ids]), position_ids=pos, past_key_values=cache, use_cache=True
            )
        else:
            pos = torch.arange(len(seq)).unsqueeze(0)
            out = model(input_ids=torch.tensor([seq]), position_ids=pos, use_cache=False)
        last = out.logits[0, -1].float()
        top2 = torch.topk(last, 2).values
        margins.append(float(top2[0] - top2[1]))
        tok = int(torch.argmax(last))
        new.append(tok)
        seq.append(tok)
    return (new, margins) if return_margins else new
