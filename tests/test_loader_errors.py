"""Clear loader errors: missing files, unknown architecture, a weight of the wrong shape, MoE configs that do not
add up, MoE layers whose expert weights are missing."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hybrid_jax
from hybrid_jax import CheckpointError, ConfigError


@pytest.fixture
def ckpt(tiny_model_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, d)
    return str(d)


def _edit_config(path, **changes):
    p = os.path.join(path, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hybrid_jax.load_pretrained("/nonexistent/model")


def test_missing_config(ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hybrid_jax.load_pretrained(ckpt)


def test_missing_weights(ckpt):
    os.remove(os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hybrid_jax.load_pretrained(ckpt)


def test_missing_shard_named_in_index(ckpt):
    names = list(load_file(os.path.join(ckpt, "model.safetensors")))
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}, f)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        hybrid_jax.load_pretrained(ckpt)


def test_unknown_architecture(ckpt):
    _edit_config(ckpt, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match="unknown architecture.*llama"):
        hybrid_jax.load_pretrained(ckpt)


def test_wrong_shape(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    w = load_file(f)
    name = next(n for n in w if n.endswith("mixer.in_proj.weight"))
    w[name] = np.zeros((w[name].shape[0] - 1, w[name].shape[1]), w[name].dtype)
    save_file(w, f)
    with pytest.raises(CheckpointError, match=r"in_proj.weight.*shape"):
        hybrid_jax.load_pretrained(ckpt)


def test_missing_tensor(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    w = load_file(f)
    del w[next(n for n in w if n.endswith("norm_f.weight"))]
    save_file(w, f)
    with pytest.raises(CheckpointError, match="norm_f.weight.*missing"):
        hybrid_jax.load_pretrained(ckpt)


MOE = ["mamba", "moe", "attention", "mamba"]


@pytest.mark.parametrize("changes, message", [
    ({"layers_block_type": MOE, "n_routed_experts": 8, "n_group": 3}, "n_group=3"),
    ({"layers_block_type": MOE, "n_routed_experts": 8, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3},
     "num_experts_per_tok=3"),
    ({"layers_block_type": MOE, "moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"model_type": "granitemoehybrid", "num_local_experts": 8, "num_experts_per_tok": 9, "layer_types": ["mamba"],
      "mamba_n_heads": 8}, "num_experts_per_tok=9"),
])
def test_moe_config_that_does_not_add_up(ckpt, changes, message):
    _edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=message):
        hybrid_jax.load_pretrained(ckpt)


def test_moe_layer_without_expert_weights(ckpt):
    """A dense checkpoint whose config says MoE: the loader names the first missing MoE tensor."""
    _edit_config(ckpt, layers_block_type=MOE, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                 moe_shared_expert_intermediate_size=8)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mixer\.gate\.weight.*missing"):
        hybrid_jax.load_pretrained(ckpt)


def test_infinity_time_step_limit(ckpt):
    _edit_config(ckpt, time_step_limit=[0.0, {"__float__": "Infinity"}])
    cfg, _ = hybrid_jax.load_pretrained(ckpt)
    assert cfg.dt_max == float("inf")
