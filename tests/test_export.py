"""hybrid_jax.export.save_pretrained is the exact inverse of hybrid_jax.load_pretrained."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from hybrid_jax import from_hf, load_pretrained
from hybrid_jax.export import save_pretrained, to_hf_tensors
from hybrid_jax.loader import expected_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_NEMOTRON = {
    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": 40, "hidden_size": 16,
    "hybrid_override_pattern": "M-*M-", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
    "intermediate_size": 24, "mlp_hidden_act": "relu2", "mamba_num_heads": 4, "mamba_head_dim": 4, "n_groups": 2,
    "ssm_state_size": 8, "conv_kernel": 4, "chunk_size": 8, "use_conv_bias": True, "use_bias": False,
    "attention_bias": False, "mlp_bias": False, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
}
TINY_GRANITE = {
    "model_type": "granitemoehybrid", "architectures": ["GraniteMoeHybridForCausalLM"], "vocab_size": 40,
    "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
    "layer_types": ["mamba", "attention", "mamba"], "position_embedding_type": "nope", "intermediate_size": 24,
    "shared_intermediate_size": 24, "num_local_experts": 0, "mamba_n_heads": 4, "mamba_d_head": 8,
    "mamba_expand": 2, "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_chunk_size": 8,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "attention_bias": False, "tie_word_embeddings": True,
    "embedding_multiplier": 12, "residual_multiplier": 0.22, "logits_scaling": 8, "attention_multiplier": 0.25,
}
TINY_BAMBA = {
    "model_type": "bamba", "architectures": ["BambaForCausalLM"], "vocab_size": 40, "hidden_size": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "attn_layer_indices": [1],
    "intermediate_size": 24, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_expand": 2, "mamba_n_groups": 1,
    "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_chunk_size": 8, "mamba_conv_bias": True, "mamba_proj_bias": True,
    "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False,
}


def random_params(cfg_dict: dict, seed: int = 0) -> dict:
    """Random params in our layout with every parameter the config has (biases only where it uses them)."""
    cfg = from_hf(cfg_dict)
    rng = np.random.default_rng(seed)
    bias_on = {"in_proj_b": cfg.mamba_proj_bias, "out_proj_b": cfg.mamba_proj_bias, "conv_b": cfg.conv_bias,
               "q_b": cfg.attention_bias, "k_b": cfg.attention_bias, "v_b": cfg.attention_bias,
               "o_b": cfg.attention_bias, "up_b": cfg.mlp_bias, "down_b": cfg.mlp_bias, "gate_b": cfg.mlp_bias}
    layers = []
    for kind in cfg.sublayers:
        p = {}
        for name, shape in expected_shapes(cfg, kind).items():
            if not bias_on.get(name, True):
                continue
            if kind == "mlp" and cfg.mlp_kind == "relu2" and name in ("gate", "gate_b"):
                continue
            p[name] = rng.standard_normal(shape).astype(np.float32)
        layers.append(p)
    V, D = cfg.vocab_size, cfg.hidden_size
    params = {"embed": rng.standard_normal((V, D)).astype(np.float32),
              "final_norm": rng.standard_normal((D,)).astype(np.float32), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = rng.standard_normal((V, D)).astype(np.float32)
    return params


def assert_params_equal(a: dict, b: dict, convert=lambda x: x):
    assert set(a) == set(b)
    assert len(a["layers"]) == len(b["layers"])
    for k in ("embed", "final_norm", "lm_head"):
        if k in a:
            np.testing.assert_array_equal(np.asarray(b[k]), convert(np.asarray(a[k])), err_msg=k)
    for i, (pa, pb) in enumerate(zip(a["layers"], b["layers"])):
        assert set(pa) == set(pb), (i, sorted(pa), sorted(pb))
        for k in pa:
            want = np.asarray(pa[k]) if k in ("A_log", "D", "dt_bias") else convert(np.asarray(pa[k]))
            got = np.asarray(pb[k])
            assert got.shape == want.shape, (i, k)
            np.testing.assert_array_equal(got, want, err_msg=f"layer {i} {k}")


@pytest.mark.parametrize("cfg_dict", [TINY_NEMOTRON, TINY_GRANITE, TINY_BAMBA], ids=lambda d: d["model_type"])
def test_save_load_roundtrip_exact(tmp_path, cfg_dict):
    params = random_params(cfg_dict)
    save_pretrained(params, cfg_dict, str(tmp_path))
    cfg, loaded = load_pretrained(str(tmp_path))
    assert cfg == from_hf(cfg_dict)
    assert_params_equal(params, loaded)
    # and again: load -> save -> load is a fixed point, byte for byte
    out2 = tmp_path / "again"
    save_pretrained(loaded, json.loads((tmp_path / "config.json").read_text()), str(out2))
    assert (tmp_path / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()


def test_nemotron_names_and_torch_layout(tmp_path):
    params = random_params(TINY_NEMOTRON)
    save_pretrained(params, TINY_NEMOTRON, str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        keys = set(f.keys())
        conv = f.get_tensor("backbone.layers.0.mixer.conv1d.weight")
        in_proj = f.get_tensor("backbone.layers.0.mixer.in_proj.weight")
        up = f.get_tensor("backbone.layers.1.mixer.up_proj.weight")
        q = f.get_tensor("backbone.layers.2.mixer.q_proj.weight")
    assert "backbone.embeddings.weight" in keys and "backbone.norm_f.weight" in keys and "lm_head.weight" in keys
    assert all(k.startswith("backbone.") or k == "lm_head.weight" for k in keys)
    cfg = from_hf(TINY_NEMOTRON)
    assert conv.shape == (cfg.conv_dim, 1, cfg.d_conv)
    np.testing.assert_array_equal(conv[:, 0, :], params["layers"][0]["conv_w"])
    assert in_proj.shape == (cfg.mamba_inner + cfg.conv_dim + cfg.mamba_heads, cfg.hidden_size)  # torch [out, in]
    np.testing.assert_array_equal(in_proj, params["layers"][0]["in_proj"].T)
    np.testing.assert_array_equal(up, params["layers"][1]["up"].T)
    np.testing.assert_array_equal(q, params["layers"][2]["q"].T)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == "float32" and written["hybrid_override_pattern"] == "M-*M-"


def test_bfloat16_export(tmp_path):
    params = random_params(TINY_NEMOTRON)
    save_pretrained(params, TINY_NEMOTRON, str(tmp_path), dtype="bfloat16")
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        assert f.get_tensor("backbone.embeddings.weight").dtype == ml_dtypes.bfloat16
        assert f.get_tensor("backbone.layers.0.mixer.A_log").dtype == np.float32  # recurrence params stay f32
    _, loaded = load_pretrained(str(tmp_path))
    assert_params_equal(params, loaded, convert=lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_granite_fuses_gate_up(tmp_path):
    params = random_params(TINY_GRANITE)
    tensors = to_hf_tensors(params, from_hf(TINY_GRANITE))
    fused = tensors["model.layers.0.shared_mlp.input_linear.weight"]
    np.testing.assert_array_equal(fused, np.concatenate([params["layers"][1]["gate"].T, params["layers"][1]["up"].T]))
    assert "lm_head.weight" not in tensors  # tied


def test_unknown_param_is_refused():
    params = random_params(TINY_NEMOTRON)
    params["layers"][0]["bogus"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="bogus"):
        to_hf_tensors(params, from_hf(TINY_NEMOTRON))


@pytest.mark.parametrize("cfg_dict", [TINY_NEMOTRON, TINY_GRANITE, TINY_BAMBA], ids=lambda d: d["model_type"])
def test_reexport_of_reference_layout_checkpoint_is_identical(tmp_path, cfg_dict):
    """A checkpoint in the released on-disk layout (random weights) -> load -> save gives the same tensors."""
    rc = pytest.importorskip("hybrid_jax.random_checkpoint")
    src, dst = tmp_path / "src", tmp_path / "dst"
    rc.write_random_checkpoint(dict(cfg_dict), str(src), dtype="float32", seed=3)
    hf = json.loads((src / "config.json").read_text())
    _, params = load_pretrained(str(src))
    save_pretrained(params, hf, str(dst))
    with safe_open(str(src / "model.safetensors"), "numpy") as a, safe_open(str(dst / "model.safetensors"), "numpy") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)


def test_tiny_repo_config_roundtrip(tmp_path):
    path = os.path.join(ROOT, "configs", "models", "tiny-nemotron-h.json")
    if not os.path.isfile(path):
        pytest.skip("configs/models/tiny-nemotron-h.json not present")
    with open(path) as f:
        hf = json.load(f)
    params = random_params(hf, seed=1)
    save_pretrained(params, hf, str(tmp_path))
    _, loaded = load_pretrained(str(tmp_path))
    assert_params_equal(params, loaded)
