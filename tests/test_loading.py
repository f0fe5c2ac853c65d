"""Loading and compiling do not grow with the weights: host memory while loading stays within 1.3x the
checkpoint's bytes (one tensor read at a time, stacked parameters moved to the device one by one), and the step
programs of two checkpoints of the same layer pattern, 14x apart in weights, are the same program (parameters
are arguments, never constants), so their compile time cannot depend on the parameter bytes."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import jax

from hybrid_jax import random_checkpoint as rc
from hybrid_jax.weights_file import checkpoint_bytes
from serving import Engine

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models",
                    "tiny-nemotron-h.json")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _widened(k: int, repeat: int = 1) -> dict:
    """The tiny NemotronH (pattern M-M*-M-, `repeat` times over) with every width k times larger: about k^2
    times the weights."""
    cfg = rc.load_config(TINY)
    cfg.update(hidden_size=128 * k, intermediate_size=256 * k, mamba_num_heads=8 * k, num_attention_heads=4 * k,
               num_key_value_heads=2 * k, hybrid_override_pattern=cfg["hybrid_override_pattern"] * repeat,
               num_hidden_layers=cfg["num_hidden_layers"] * repeat)
    return cfg


def test_peak_host_memory_while_loading_is_within_1_3x_the_checkpoint(tmp_path):
    # 28 layers, as real checkpoints have tens: the largest tensor is 2% of the checkpoint
    out = rc.write_random_checkpoint(_widened(6, repeat=4), tmp_path / "w6", dtype="float32", seed=1)
    assert checkpoint_bytes(out) > 200 << 20
    p = subprocess.run([sys.executable, "-m", "bench.bench_loading", "--checkpoint", out], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-2000:]
    print("\n[loading]", p.stdout.strip())
    ratio = float(re.search(r"peak/checkpoint ([0-9.]+)", p.stdout).group(1))
    assert ratio <= 1.3, p.stdout


def _programs(path: str) -> dict[tuple, str]:
    """The engine's first decode and prefill step programs for the checkpoint at path, as text with every number
    replaced (shapes differ between widths; nothing else may)."""
    e = Engine.from_pretrained(path, max_model_len=256, max_num_seqs=2)
    try:
        shapes = e.runner.shapes()
        picked = [next(s for s in shapes if s[0] == kind) for kind in ("decode", "prefill")]
        texts = {}
        for shape in picked:
            lowered = e._call(lambda shape=shape: e.runner.lowered(*shape))
            text = lowered.as_text()
            assert "dense_resource" not in text  # no array baked into the program
            n_args = len(jax.tree_util.tree_leaves(lowered.args_info))
            assert n_args >= len(jax.tree_util.tree_leaves(e.params))  # every parameter is an argument
            texts[shape] = re.sub(r"\d+", "N", text)
        return texts
    finally:
        e.shutdown()


def test_step_programs_are_the_same_whatever_the_weights(tmp_path):
    small = rc.write_random_checkpoint(_widened(1), tmp_path / "w1", dtype="float32", seed=1)
    large = rc.write_random_checkpoint(_widened(4), tmp_path / "w4", dtype="float32", seed=1)
    assert checkpoint_bytes(large) >= 10 * checkpoint_bytes(small)
    a, b = _programs(small), _programs(large)
    assert list(a) == list(b)
    for shape in a:
        assert a[shape] == b[shape], shape


def test_auto_dtype_on_a_cpu_computes_in_float32_where_it_fits(tmp_path, caplog):
    """--dtype auto on a CPU loads a bfloat16 checkpoint as float32 (and says so); an explicit dtype is obeyed,
    and float32 weights that would not fit the memory available keep the checkpoint's dtype."""
    import jax.numpy as jnp

    from serving import cpu_dtype

    out = rc.write_random_checkpoint(_widened(1), tmp_path / "bf16", dtype="bfloat16", seed=1)
    with caplog.at_level("INFO", logger="serving"):
        auto = Engine.from_pretrained(out, max_model_len=256, max_num_seqs=2)
    try:
        assert auto.params["embed"].dtype == jnp.float32
        assert auto.params["stack"]["mamba"]["in_proj"].dtype == jnp.float32
        assert any("computes in float32 on the CPU" in r.getMessage() for r in caplog.records)
    finally:
        auto.shutdown()
    kept = Engine.from_pretrained(out, dtype="bfloat16", max_model_len=256, max_num_seqs=2)
    try:
        assert kept.params["embed"].dtype == jnp.bfloat16
    finally:
        kept.shutdown()
    size = checkpoint_bytes(out)
    assert cpu_dtype.resolve("auto", "bfloat16", "cpu", size, available=size)[0] == "auto"  # 2x would not fit
    assert cpu_dtype.resolve("auto", "bfloat16", "gpu", size, available=None)[0] == "auto"
    assert cpu_dtype.resolve("auto", "float32", "cpu", size, available=None)[0] == "auto"
