"""hybrid_jax against the Hugging Face transformers oracle (tests/hf_oracle.py).

Tiny random checkpoints of each family, in several layer orders and on-disk
forms, are written with transformers and read back with
``hybrid_jax.load_pretrained``. Two checks per checkpoint:

* uncached ``hybrid_jax.forward`` vs one HF forward, batch 2 x 40 tokens
  (chunk_size 16: two chunk boundaries plus a partial chunk). Metric:
  relative error = max|jax - hf| / max|hf| over the whole [B, T, V] logits,
  must be <= MAX_REL_ERR.
* ``hybrid_jax.generate_greedy`` (paged-cache prefill + decode) vs HF greedy by
  full recomputation: 32 tokens after a 20-token prompt, token for token.

The oracle-only tests at the bottom keep the oracle honest (HF's own cached
decode agrees with its recomputation once patched; every parameter moves the
logits by more than the tolerance) and run without hybrid_jax.
"""

from __future__ import annotations

import importlib
import types

import numpy as np
import pytest
import torch

import hf_oracle as H

MAX_REL_ERR = 1e-4
BATCH, SEQ_LEN = 2, 40
PROMPT_LEN, N_NEW = 20, 32
# Smallest HF top1-top2 logit gap allowed along the greedy reference (about
# 100x the float32 discrepancy expected between engines), so that a token
# mismatch means a bug rather than a near tie.
MIN_MARGIN = 1e-3

slow = pytest.mark.slow
# id -> (family, layer pattern, make_tiny_checkpoint options)
CASES = [
    # NemotronH: default save_pretrained form (layers_block_type, backbone.*, {"__float__": "Infinity"}).
    pytest.param(("nemotron_h", "M*M-M", {}), id="nemotron-M*M-M"),
    pytest.param(("nemotron_h", "*M-M", {}), id="nemotron-*M-M"),
    pytest.param(("nemotron_h", "MM-*-", {}), id="nemotron-MM-*-", marks=slow),
    # NVIDIA-style config: hybrid_override_pattern, bare Infinity token.
    pytest.param(("nemotron_h", "M-*M-", dict(legacy_pattern=True, inf_style="bare")), id="nemotron-legacy-M-*M-"),
    # model.* keys and no time_step_limit key at all (default (0, inf)).
    pytest.param(("nemotron_h", "M*M-M", dict(backbone_keys=False, inf_style="omit")), id="nemotron-modelkeys",
                 marks=slow),
    # Granite 4.0-H-Micro layout: dense shared MLP, tied embeddings, "mamba"/"attention" names.
    pytest.param(("granitemoehybrid", ["mamba", "attention", "mamba", "mamba"],
                  dict(position_embedding_type="rope", legacy_layer_names=True)), id="granite-rope-MAMM"),
    pytest.param(("granitemoehybrid", ["mamba", "attention", "mamba", "mamba"],
                  dict(position_embedding_type="nope")), id="granite-nope-MAMM"),
    pytest.param(("granitemoehybrid", ["attention", "mamba", "mamba", "attention"],
                  dict(position_embedding_type="rope", tie_word_embeddings=False)), id="granite-rope-AMMA-untied",
                 marks=slow),
    # Bamba: partial rotary 0.5, attention at index 1 / index 0.
    pytest.param(("bamba", "M*MM", {}), id="bamba-attn1"),
    pytest.param(("bamba", "*MM", dict(inf_style="bare")), id="bamba-attn0"),
    pytest.param(("bamba", "M*M", dict(attention_bias=True, mlp_bias=True, mamba_proj_bias=True)),
                 id="bamba-biases", marks=slow),
]


def _tokens():
    rng = np.random.default_rng(1234)
    return rng.integers(3, H.VOCAB, size=(BATCH, SEQ_LEN)).astype(np.int32)


def _greedy_reference(model):
    """First prompt (by seed) whose HF greedy continuation has no near tie."""
    for seed in range(20):
        prompt = np.random.default_rng(seed).integers(3, H.VOCAB, size=PROMPT_LEN).tolist()
        greedy, margins = H.reference_greedy(model, prompt, N_NEW, return_margins=True)
        if min(margins) > MIN_MARGIN:
            return prompt, greedy, margins
    raise AssertionError("no tie-free greedy prompt found; is the init discriminating?")


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    """The HF models are tiny: torch's intra-op threads only add overhead, and on a
    busy 2-core box they make the reference ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=CASES)
def oracle(request, tmp_path_factory):
    """Checkpoint on disk + HF reference outputs, computed once per case."""
    family, pattern, opts = request.param
    path = str(tmp_path_factory.mktemp("ckpt"))
    H.make_tiny_checkpoint(family, path, pattern, seed=0, **opts)
    model = H.load_reference(path)
    tokens = _tokens()
    prompt, greedy, margins = _greedy_reference(model)
    return types.SimpleNamespace(
        family=family, path=path, model=model, tokens=tokens, prompt=prompt,
        logits=H.reference_logits(model, tokens), greedy=greedy, margins=margins,
    )


@pytest.fixture(scope="module")
def hj():
    """hybrid_jax, imported lazily so that the oracle-only tests run without it.

    An import error here is a test error, not a skip: the package must exist.
    """
    return importlib.import_module("hybrid_jax")


def _exact_matmuls():
    """Full float32 matmuls on accelerators too (CPU already is); scoped, not global."""
    import jax

    return jax.default_matmul_precision("highest")


@pytest.fixture(scope="module")
def loaded(oracle, hj):
    cfg, params = hj.load_pretrained(oracle.path, dtype="float32")
    return cfg, params


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def test_forward_matches_hf(oracle, hj, loaded):
    cfg, params = loaded
    with _exact_matmuls():
        got = np.asarray(hj.forward(params, cfg, oracle.tokens), dtype=np.float32)
    assert got.shape == oracle.logits.shape, (got.shape, oracle.logits.shape)
    err = _rel_err(got, oracle.logits)
    if err > MAX_REL_ERR:
        # Where it goes wrong says a lot: from position 0 (weights/norms), from
        # the first attention use, or only past a chunk boundary (16, 32).
        scale = np.max(np.abs(oracle.logits))
        per_pos = np.max(np.abs(got - oracle.logits), axis=(0, 2)) / scale
        first_bad = int(np.argmax(per_pos > MAX_REL_ERR))
        pytest.fail(
            f"{oracle.family}: max rel err {err:.3e} > {MAX_REL_ERR:g}; first bad position {first_bad}; "
            f"per-position rel err: {np.array2string(per_pos, precision=1, max_line_width=200)}"
        )


def test_greedy_matches_hf(oracle, hj, loaded):
    cfg, params = loaded
    with _exact_matmuls():
        got = [int(t) for t in hj.generate_greedy(params, cfg, list(oracle.prompt), N_NEW)]
    if got != oracle.greedy:
        step = next(i for i, (a, b) in enumerate(zip(got + [None] * N_NEW, oracle.greedy)) if a != b)
        pytest.fail(
            f"{oracle.family}: greedy differs at step {step} (HF top1-top2 margin there "
            f"{oracle.margins[step]:.2e}, smallest margin {min(oracle.margins):.2e})\n"
            f"  jax: {got}\n  hf:  {oracle.greedy}"
        )


# ---------------------------------------------------------------- oracle only


def test_oracle_cached_decode_matches_recompute(oracle):
    """With the time_step_limit patch, HF's prefill + one-token decode path gives
    the same tokens as recomputing the whole sequence, so the greedy oracle does
    not depend on which HF path produced it."""
    cached = H.reference_greedy(oracle.model, oracle.prompt, N_NEW, use_cache=True)
    assert cached == oracle.greedy


def test_oracle_logits_are_discriminating(oracle):
    assert oracle.logits.std() > 0.5
    assert oracle.logits.std(axis=-1).min() > 0.4  # every position, not just on average
    assert len(set(oracle.greedy)) > N_NEW // 2  # not stuck repeating one token


@torch.no_grad()
def test_oracle_every_parameter_matters(oracle):
    """Scaling any single parameter tensor by 1.05 moves the logits by more than
    2 * MAX_REL_ERR, so the forward test catches any mis-loaded tensor."""
    model, tokens = oracle.model, oracle.tokens
    base = H.reference_logits(model, tokens)
    weak = []
    for name, p in model.named_parameters():
        saved = p.detach().clone()
        p.mul_(1.05)
        err = _rel_err(H.reference_logits(model, tokens), base)
        p.copy_(saved)
        if err <= 2 * MAX_REL_ERR:
            weak.append((name, err))
    assert not weak, weak
