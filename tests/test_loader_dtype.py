"""dtype from the checkpoint: `load_pretrained(dir)` ("auto") gives the checkpoint's torch_dtype, bit-exact and
without a float32 detour; A_log, D, dt_bias stay float32; stacked=True gives hybrid_jax.stack's layout."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from hybrid_jax.config import ConfigError, from_hf
from hybrid_jax.loader import (FLOAT32_PARAMS, load_pretrained, read_config, read_raw_tensor, resolve_dtype,
                               sublayer_sources)
from hybrid_jax.stack import stack_layers

LAYERS = ("mamba", "attention", "mlp", "mamba", "mlp")


def _write_bf16_model(out_dir: str, f32_ssm_params: bool = False, seed: int = 0) -> str:
    """A tiny random NemotronH checkpoint written by transformers in bfloat16 (optionally with A_log, D, dt_bias
    kept float32 on disk, as some released checkpoints store them)."""
    import torch
    from transformers import AutoModelForCausalLM, NemotronHConfig

    torch.manual_seed(seed)
    c = NemotronHConfig(vocab_size=96, hidden_size=32, layers_block_type=list(LAYERS), num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
                        mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
                        use_conv_bias=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    m = AutoModelForCausalLM.from_config(c).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "A_log" in n:
                p.copy_(torch.log(torch.rand_like(p) * 15 + 1))
            elif "dt_bias" in n:
                p.copy_(torch.randn_like(p) * 0.5 - 2)
            else:
                p.normal_(0, 0.3)
    m = m.to(torch.bfloat16)
    if f32_ssm_params:
        for n, p in m.named_parameters():
            if n.rsplit(".", 1)[-1] in FLOAT32_PARAMS:
                p.data = p.data.float() + 1e-3  # values a bf16 could not hold
    m.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return _write_bf16_model(str(tmp_path_factory.mktemp("bf16_model")))


def _disk_tensors(path: str) -> dict:
    """The checkpoint's tensors as torch reads them (torch bf16, independent of numpy/ml_dtypes)."""
    out = {}
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _ours(name: str, t):
    """A torch tensor in our layout (see loader._to_ours)."""
    if name == "conv_w":
        t = t.reshape(t.shape[0], t.shape[-1])
    elif t.ndim == 2:
        t = t.T
    return t.contiguous()


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _torch_bits(t) -> np.ndarray:
    import torch
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]
                  ).numpy().view({2: np.uint16, 4: np.uint32}[t.element_size()])


def _pairs(cfg, params, disk):
    """(our name, our array, torch tensor) for every parameter."""
    pre = "backbone." if any(k.startswith("backbone.") for k in disk) else "model."
    emb = pre + "embeddings.weight" if pre + "embeddings.weight" in disk else pre + "embed_tokens.weight"
    yield "embed", params["embed"], disk[emb]
    yield "final_norm", params["final_norm"], disk[pre + "norm_f.weight"]
    yield "lm_head", params["lm_head"], disk["lm_head.weight"]
    for i, names in enumerate(sublayer_sources(cfg, pre)):
        for ours, theirs in names.items():
            if theirs not in disk:
                assert ours not in params["layers"][i]
                continue
            yield ours, params["layers"][i][ours], _ours(ours, disk[theirs])


def test_config_names_bf16(bf16_dir):
    hf = read_config(bf16_dir)
    assert (hf.get("torch_dtype") or hf.get("dtype")) == "bfloat16"
    assert from_hf(hf).torch_dtype == "bfloat16"


def test_auto_loads_bf16_bit_exact(bf16_dir):
    cfg, params = load_pretrained(bf16_dir)
    assert cfg.torch_dtype == "bfloat16"
    disk = _disk_tensors(bf16_dir)
    seen = set()
    for name, ours, theirs in _pairs(cfg, params, disk):
        assert isinstance(ours, jax.Array)
        seen.add(name)
        if name in FLOAT32_PARAMS:
            assert ours.dtype == jnp.float32, name
            np.testing.assert_array_equal(np.asarray(ours), theirs.float().numpy(), err_msg=name)
        else:
            assert ours.dtype == jnp.bfloat16, name
            assert ours.shape == tuple(theirs.shape), name
            np.testing.assert_array_equal(_bits(ours), _torch_bits(theirs), err_msg=name)
    assert {"A_log", "D", "dt_bias", "in_proj", "conv_w", "q", "o", "up", "down", "embed", "lm_head"} <= seen


def test_float32_ssm_params_on_disk_are_kept_exactly(tmp_path):
    path = _write_bf16_model(str(tmp_path / "mixed"), f32_ssm_params=True, seed=1)
    cfg, params = load_pretrained(path)
    disk = _disk_tensors(path)
    n = 0
    for name, ours, theirs in _pairs(cfg, params, disk):
        if name in FLOAT32_PARAMS:
            n += 1
            assert str(theirs.dtype) == "torch.float32" and ours.dtype == jnp.float32
            np.testing.assert_array_equal(_bits(ours), _torch_bits(theirs), err_msg=name)
        else:
            assert ours.dtype == jnp.bfloat16
    assert n == 3 * LAYERS.count("mamba")


def test_float32_override(bf16_dir):
    cfg, params = load_pretrained(bf16_dir, dtype="float32")
    for name, ours, theirs in _pairs(cfg, params, _disk_tensors(bf16_dir)):
        assert ours.dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(ours), theirs.float().numpy(), err_msg=name)


def test_float16_override(bf16_dir):
    cfg, params = load_pretrained(bf16_dir, dtype="float16")
    for name, ours, theirs in _pairs(cfg, params, _disk_tensors(bf16_dir)):
        assert ours.dtype == (jnp.float32 if name in FLOAT32_PARAMS else jnp.float16), name
        np.testing.assert_array_equal(np.asarray(ours, np.float32),
                                      theirs.float().numpy().astype(np.float16 if name not in FLOAT32_PARAMS
                                                                    else np.float32).astype(np.float32))


def test_stacked_layout_same_values(bf16_dir):
    cfg, lst = load_pretrained(bf16_dir)
    _, st = load_pretrained(bf16_dir, stacked=True)
    assert "layers" not in st and set(st["stack"]) == {"mamba", "attention", "mlp"}
    want = stack_layers({k: (jax.tree.map(np.asarray, v)) for k, v in lst.items()}, cfg, xp=np)
    assert jax.tree.structure(st) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(st), jax.tree.leaves(want)):
        assert isinstance(a, jax.Array), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(path))
    assert st["stack"]["mamba"]["A_log"].dtype == jnp.float32
    assert st["stack"]["mamba"]["in_proj"].dtype == jnp.bfloat16
    assert st["stack"]["mamba"]["in_proj"].shape[0] == LAYERS.count("mamba")
    assert st["stack"]["mlp"]["up"].shape[0] == LAYERS.count("mlp")
    # Same values as the list form, layer by layer.
    mamba_layers = [p for k, p in zip(cfg.sublayers, lst["layers"]) if k == "mamba"]
    for j, p in enumerate(mamba_layers):
        np.testing.assert_array_equal(_bits(st["stack"]["mamba"]["conv_w"][j]), _bits(p["conv_w"]))


def test_no_dtype_in_config_means_float32(tmp_path, bf16_dir):
    d = tmp_path / "nodtype"
    shutil.copytree(bf16_dir, d)
    hf = json.loads((d / "config.json").read_text())
    hf.pop("torch_dtype", None)
    hf.pop("dtype", None)
    (d / "config.json").write_text(json.dumps(hf))
    cfg, params = load_pretrained(str(d))
    assert cfg.torch_dtype == "float32"
    assert params["embed"].dtype == jnp.float32 and params["layers"][1]["q"].dtype == jnp.float32


SMALL_HF = {"model_type": "nemotron_h", "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
            "hybrid_override_pattern": "M*", "intermediate_size": 8, "mamba_num_heads": 2, "mamba_head_dim": 4}


def test_resolve_dtype():
    cfg = from_hf({**SMALL_HF, "torch_dtype": "bfloat16"})
    assert resolve_dtype(cfg, "auto") == jnp.bfloat16
    assert resolve_dtype(cfg, None) == jnp.bfloat16
    assert resolve_dtype(cfg, "float32") == jnp.float32
    assert resolve_dtype(cfg, "float16") == jnp.float16
    assert resolve_dtype(cfg, jnp.float32) == jnp.float32
    assert resolve_dtype(cfg, np.dtype(ml_dtypes.bfloat16)) == jnp.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype(cfg, "int8")
    with pytest.raises(ConfigError, match="float8_e4m3fn"):
        resolve_dtype(dataclasses.replace(cfg, torch_dtype="float8_e4m3fn"), "auto")
    # transformers 5 writes "dtype"; some configs spell it "torch.float16"; absent means float32.
    assert from_hf({**SMALL_HF, "torch_dtype": None, "dtype": "torch.float16"}).torch_dtype == "float16"
    assert from_hf({**SMALL_HF, "dtype": "bfloat16"}).torch_dtype == "bfloat16"
    assert from_hf(SMALL_HF).torch_dtype == "float32"
    assert resolve_dtype(from_hf(SMALL_HF), "auto") == jnp.float32


def test_raw_reader_matches_safetensors(bf16_dir):
    fn = os.path.join(bf16_dir, "model.safetensors")
    with safe_open(fn, "numpy") as f:
        for k in f.keys():
            a, b = f.get_tensor(k), read_raw_tensor(fn, k)
            assert a.dtype == b.dtype and a.shape == b.shape, k
            np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=k)
    assert read_raw_tensor(fn, "lm_head.weight").dtype == ml_dtypes.bfloat16


def test_cli_dtype_and_memory_flags():
    from serving.__main__ import build_parser
    a = build_parser().parse_args([])
    assert a.dtype == "auto" and a.gpu_memory_utilization is None and a.num_slots is None
    a = build_parser().parse_args(["--dtype", "bfloat16", "--gpu-memory-utilization", "0.9", "--num-slots", "64",
                                   "--kv-memory", "40GiB"])
    assert (a.dtype, a.gpu_memory_utilization, a.num_slots, a.kv_memory) == ("bfloat16", 0.9, 64, "40GiB")
    for bad in (["--gpu-memory-utilization", "0"], ["--gpu-memory-utilization", "1.5"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
