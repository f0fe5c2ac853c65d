"""The architecture of a config.json dict as the checkpoint writer reads it: its model type, its layer kinds, a
truncated copy, and whether the writer can produce it (hybrid_jax/random_checkpoint.py).

The layer kind spellings are those of hybrid_jax/config.py; this reads the raw dict (any spelling, any case) so
that a config can be truncated and written back in the spelling it came in.
"""
from __future__ import annotations

import copy
import json
import os

from hybrid_jax.config import FAMILIES, LAYER_TYPE_KINDS, PATTERN_KINDS


class UnsupportedConfigError(ValueError):
    """The config is of an architecture this writer does not produce (unknown model_type, ...)."""


def load_config(path: str) -> dict:
    """Read a config.json (a file, or a directory holding one). ``Infinity`` is accepted."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


_KIND_CHAR = {v: k for k, v in PATTERN_KINDS.items()}
# the layer type spellings of the config module (remote code: mamba/attention; transformers 5:
# linear/full_attention), any case, and a few more that this writer alone accepts
_KIND_SPELLINGS = LAYER_TYPE_KINDS | {"m": "mamba", "mamba2": "mamba", "attn": "attention"}
_ARCHITECTURES = {"NemotronHForCausalLM": "nemotron_h", "GraniteMoeHybridForCausalLM": "granitemoehybrid",
                  "BambaForCausalLM": "bamba"}


def _norm_kind(k: str) -> str:
    try:
        return _KIND_SPELLINGS[str(k).lower()]
    except KeyError:
        raise UnsupportedConfigError(f"unknown layer type {k!r}") from None


def model_type(config: dict) -> str:
    """The config's model_type (from its architectures when absent); UnsupportedConfigError for any but FAMILIES."""
    mt = config.get("model_type")
    if mt is None:
        mt = _ARCHITECTURES.get((config.get("architectures") or [""])[0])
    if mt not in FAMILIES:
        raise UnsupportedConfigError(f"model_type {mt!r} is not supported (supported: {', '.join(FAMILIES)})")
    return mt


def layer_kinds(config: dict) -> list[str]:
    """Per-layer kind: ``mamba``, ``attention``, ``mlp`` (NemotronH only) or ``moe``.

    Granite/Bamba layers are hybrid blocks (mixer + MLP); their kind names the mixer.
    """
    mt = model_type(config)
    if mt == "nemotron_h":
        pattern = config.get("hybrid_override_pattern")
        if pattern is not None:
            try:
                return [PATTERN_KINDS[c] for c in pattern]
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
    mt = model_type(cfg)
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
    mt = model_type(config)
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
