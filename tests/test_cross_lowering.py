"""The engine's programs lowered for CUDA and TPU on a machine that has neither (tests/xlower_checks.py), at the
real shapes of NVIDIA-Nemotron-Nano-9B-v2 and Granite-4.0-H-Micro (dense) and NVIDIA-Nemotron-3-Nano-30B-A3B
(mixture of experts), bf16, from shapes only (no weights in memory), with tensor parallel 1 (in this process) and 4
(4 forced host devices, in a subprocess).

Programs: the serving decode step (smallest bucket; 8 rows over a full-length block table) and prefill step (a
256-token chunk in 4 rows) exactly as `ModelRunner.lowered` lowers them, grammar masks and bias included; the
cache's block and slot copies; the host tier's gather and scatter (1 block, a full-length sequence).

Kernels: on cuda the Pallas Triton kernels are forced (`HYBRID_KERNELS=pallas` inside `ops.lowering_for("cuda")`)
and lowered for real - tile shapes, block constraints and primitives the Triton lowering rejects fail here - and
each step must contain its three kernels. On tpu the kernels are Triton-only today, so `auto` is what runs there:
the jnp references (and `lax.ragged_dot` for the experts); the steps must contain no Triton kernel. The programs
are lowered, not compiled: XLA's GPU/TPU compilers (and Triton's own compile to PTX) do not run here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import xlower_checks as X

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(os.path.dirname(HERE), "configs", "models")
CONFIGS = {"nano-9b-v2": "nvidia-nemotron-nano-9b-v2.json", "granite-micro": "granite-4.0-h-micro.json",
           "nemotron-3-moe": "nvidia-nemotron-3-nano-30b-a3b.json"}
PLATFORMS = ("cuda", "tpu")
STEP_KERNELS = {"decode step": ["causal_conv1d_step", "paged_attention", "ssm_decode_step"],
                "prefill step": ["causal_conv1d", "paged_attention", "ssd_scan"]}


def _path(config: str) -> str:
    return os.path.join(MODELS, CONFIGS[config])


def _check(results: list[dict], platform: str, tp: int) -> None:
    assert len(results) == 3 + 2 + 2 * len(X.MOVE_WIDTHS), [r["program"] for r in results]

    def where(r):
        return f"{r['program']} [{r['shape']}] for {r['platform']} at tp {r['tp']} ({r['config']})"
    failed = [f"{where(r)} did not lower: {r['error']}" for r in results if r["error"]]
    assert not failed, "\n".join(failed)
    for r in results:
        want = STEP_KERNELS.get(r["program"], []) if platform == "cuda" else []
        assert r["kernels"] == want, f"{where(r)}: Triton kernels {r['kernels']}, expected {want}"
        assert r["devices"] == tp, f"{where(r)}: exported for {r['devices']} devices, expected {tp}"


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("config", CONFIGS)
def test_programs_lower_at_tp1(config, platform):
    _check(X.lower(_path(config), platform, 1), platform, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir):
    """Small checkpoints to compare abstract_model with the loader on: one written by transformers, and one by our
    writer per config (widths shrunk, layer kinds kept)."""
    d = tmp_path_factory.mktemp("small_checkpoints")
    return [tiny_model_dir] + [X.small_checkpoint(_path(c), str(d / c)) for c in CONFIGS]


@pytest.fixture(scope="module")
def tp4(tmp_path_factory, checkpoints):
    """Every config x platform lowered at tp 4, and the abstract models checked against loaded ones, in one
    subprocess (4 host devices)."""
    out = tmp_path_factory.mktemp("xlower") / "tp4.json"
    root = os.path.dirname(HERE)  # the checkout's packages, however (or whether) they are installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cases = [f"{_path(c)}:{p}" for c in CONFIGS for p in PLATFORMS] + checkpoints
    r = subprocess.run([sys.executable, os.path.join(HERE, "xlower_checks.py"), "4", str(out), *cases], cwd=root,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.load(open(out))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("config", CONFIGS)
def test_programs_lower_at_tp4(tp4, config, platform):
    _check([r for r in tp4["results"] if r["config"] == CONFIGS[config] and r["platform"] == platform], platform, 4)


def test_abstract_model_is_the_loaded_one(tp4, checkpoints):
    """abstract_model gives the loader's params (names, shapes, dtypes) for checkpoints of the three configs'
    families and layouts, and at tp 4 shard_model's layout and partition specs."""
    assert [m for c in checkpoints for m in X.abstract_mismatches(c, 1)] == []
    assert tp4["abstract_mismatches"] == []
