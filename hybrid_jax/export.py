"""Write params back to a Hugging Face checkpoint directory: the inverse of `hybrid_jax.loader`.

`save_pretrained(params, cfg_dict, out_dir)` writes `config.json` and `model.safetensors` under the tensor names
and torch layouts the loader reads (and the released checkpoints use):

* nemotron_h: `backbone.embeddings`, `backbone.layers.N.{norm, mixer.*}`, `backbone.norm_f`, `lm_head`;
* granitemoehybrid: `model.embed_tokens`, `model.layers.J.{input_layernorm, mamba.*|self_attn.*,
  post_attention_layernorm, shared_mlp.input_linear ([gate; up] fused), shared_mlp.output_linear}`, `model.norm`;
* bamba: `model.embed_tokens`, `model.layers.J.{input_layernorm, mamba.*|self_attn.*, pre_ff_layernorm,
  feed_forward.*}`, `model.final_layernorm`.
* mixture-of-experts layers as the checkpoints store them: NemotronH one tensor per expert
  (`mixer.experts.{e}.up_proj.weight`), Granite `block_sparse_moe.input_linear` ([gate; up] fused, [E, 2I, D]),
  `output_linear`, `router.layer`.

Projections go from our [in, out] back to torch Linear [out, in]; the depthwise conv goes from [C, W] back to
[C, 1, W]. Mamba `A_log`, `D` and `dt_bias` are always written in float32 (the loader keeps them float32).
`load_pretrained(out_dir)` then gives back exactly the same params (bit-exact for float32; for bfloat16 the
loader's float32 upcast of the bf16 values).
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from hybrid_jax.config import ModelConfig, from_hf
from hybrid_jax.loader import FLOAT32_PARAMS, FusedPart, PerExpert, sublayer_sources, top_level_names
from hybrid_jax.weights_file import STORAGE_DTYPES, storage_dtype

__all__ = ["save_pretrained", "to_hf_tensors"]

_F32_ALWAYS = FLOAT32_PARAMS


def _to_theirs(name: str, a: np.ndarray) -> np.ndarray:
    """Our layout -> torch layout (inverse of loader._to_ours)."""
    if name == "conv_w":
        return a.reshape(a.shape[0], 1, a.shape[1])  # [C, W] -> torch [C, 1, W]
    if a.ndim == 2:
        return np.ascontiguousarray(a.T)  # [in, out] -> torch Linear [out, in]
    if a.ndim == 3:
        return np.ascontiguousarray(a.transpose(0, 2, 1))  # experts [E, in, out] -> [E, out, in]
    return a


def _layer_names(cfg: ModelConfig) -> list[dict[str, str]]:
    """For each of our sublayers: our param name -> checkpoint tensor name (the loader's mapping, inverted by
    the caller; "gate_up" is Granite's fused MLP input)."""
    return sublayer_sources(cfg, top_level_names(cfg)[0].split(".")[0] + ".")


def to_hf_tensors(params: dict, cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Checkpoint tensor name -> numpy array in torch layout, cast to dtype (Mamba A_log/D/dt_bias stay f32)."""
    np_dtype = STORAGE_DTYPES[storage_dtype(dtype)]

    def cast(name: str, a) -> np.ndarray:
        a = np.asarray(a)
        want = np.float32 if name in _F32_ALWAYS else np_dtype
        if a.dtype != np.float32 and a.dtype != want:
            a = a.astype(np.float32)
        return np.ascontiguousarray(a.astype(want))

    layers = params["layers"]
    if len(layers) != len(cfg.sublayers):
        raise ValueError(f"params hold {len(layers)} sublayers, the config {len(cfg.sublayers)}")
    out: dict[str, np.ndarray] = {}
    for li, (p, names) in enumerate(zip(layers, _layer_names(cfg))):
        if "gate_up" in names:  # Granite fuses [gate; up] along the output dim (torch [2I, D])
            gate, up = _to_theirs("gate", np.asarray(p["gate"])), _to_theirs("up", np.asarray(p["up"]))
            out[names["gate_up"]] = cast("gate_up", np.concatenate([gate, up], axis=0))
        known = set(names) - {"gate_up"} | ({"gate", "up"} if "gate_up" in names else set())
        extra = set(p) - known
        if extra:
            raise ValueError(f"sublayer {li} ({cfg.sublayers[li]}) has params {sorted(extra)} with no checkpoint name")
        fused: dict[str, dict[int, np.ndarray]] = {}
        for ours, theirs in names.items():
            if ours == "gate_up" or ours not in p:
                continue
            a = _to_theirs(ours, np.asarray(p[ours]))
            if isinstance(theirs, PerExpert):
                for e in range(theirs.num):
                    out[theirs.pattern.format(e)] = cast(ours, a[e])
            elif isinstance(theirs, FusedPart):
                fused.setdefault(theirs.name, {})[theirs.part] = a
            else:
                out[theirs] = cast(ours, a)
        for name, parts in fused.items():  # torch [.., parts * n, in]: the parts along the out dim
            out[name] = cast(name, np.concatenate([parts[i] for i in sorted(parts)], axis=-2))
    embed, final = top_level_names(cfg)
    out[embed] = cast("embed", params["embed"])  # [V, D] in both layouts
    out[final] = cast("final_norm", params["final_norm"])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = cast("lm_head", params["lm_head"])  # [V, D] in both layouts
    return out


def save_pretrained(params: dict, cfg_dict: dict, out_dir: str, dtype: str = "float32") -> str:
    """Write `config.json` (cfg_dict with torch_dtype set to dtype) and `model.safetensors` to out_dir.

    params is the pytree `load_pretrained` returns for cfg_dict (projections [in, out]). Returns out_dir.
    """
    dtype = storage_dtype(dtype)
    cfg = from_hf(cfg_dict)
    tensors = to_hf_tensors(params, cfg, dtype)
    os.makedirs(out_dir, exist_ok=True)
    hf = dict(cfg_dict)
    hf["torch_dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
    # Sorted names give byte-identical files for identical params.
    save_file({k: tensors[k] for k in sorted(tensors)}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
