"""Mixture-of-experts hybrids against the transformers oracle (tests/hf_oracle.py), as tests/test_oracle.py does
for the dense ones.

Tiny random float32 checkpoints written by transformers itself (init std 0.15, router correction bias std 0.1):
NemotronH "E" layers in several layer orders (MoE before the first Mamba layer, MoE beside an MLP in the same
tail), with and without the latent projection, grouped top-k on and off, norm_topk_prob on and off, MLP biases
(shared expert and latent projections); Granite 4.0-H MoE (num_local_experts > 0: softmax router, SwiGLU experts
fused as input_linear/output_linear, plus the shared MLP). Per checkpoint:

* uncached forward vs one HF forward, 2 x 40 tokens: max|jax - hf| / max|hf| <= 1e-4;
* 32 greedy tokens through the paged-cache prefill + decode path, token for token (HF greedy by recomputation,
  on a prompt whose HF top1 - top2 margins all exceed 1e-3);
* 32 tokens prefilled in awkward pieces (1, 7, 13, 11) then 7 decode steps give the uncached forward's logits
  (invariant I1 for MoE models);
* hybrid_jax.export writes the checkpoint back bit for bit under transformers' names;
* oracle checks: every parameter and the router bias move the logits, HF's cached decode agrees with its
  recomputation, logits are discriminating, and the tokens use most experts.
"""
from __future__ import annotations

import importlib
import types

import jax
import numpy as np
import pytest
import torch

import hf_oracle as H
import test_oracle as O

MAX_REL_ERR = O.MAX_REL_ERR
slow = pytest.mark.slow
GRANITE_MOE = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=48)
CASES = [
    # NemotronH Nano-style: sigmoid router, no groups, norm_topk_prob, shared relu2 expert.
    pytest.param(("nemotron_h", "MEM*E", {}), id="nemotron-MEM*E"),
    # Super-style latent projection, grouped top-k (4 groups, best 2), scaling 2.5; MoE in the prefix and an MLP
    # and a MoE in the same tail.
    pytest.param(("nemotron_h", "E*ME-M", dict(moe_latent_size=24, n_group=4, topk_group=2,
                                                routed_scaling_factor=2.5)), id="nemotron-latent-grouped-E*ME-M"),
    # NVIDIA-style config (hybrid_override_pattern), no normalisation of the top-k weights, top-3, MLP biases.
    pytest.param(("nemotron_h", "MEME*E", dict(legacy_pattern=True, inf_style="bare", norm_topk_prob=False,
                                               num_experts_per_tok=3, n_group=2, topk_group=1, mlp_bias=True,
                                               moe_latent_size=40)), id="nemotron-legacy-biases-MEME*E",
                 marks=slow),
    # Granite 4.0-H Tiny/Small layout: MoE on every layer plus the shared MLP, tied, "mamba"/"attention" names;
    # attention first (a mixer and a MoE before the first Mamba layer).
    pytest.param(("granitemoehybrid", ["attention", "mamba", "mamba"],
                  dict(GRANITE_MOE, position_embedding_type="rope", legacy_layer_names=True)), id="granite-moe-AMM"),
]


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=CASES)
def oracle(request, tmp_path_factory):
    family, pattern, opts = request.param
    path = str(tmp_path_factory.mktemp("moe_ckpt"))
    H.make_tiny_checkpoint(family, path, pattern, seed=0, **opts)
    model = H.load_reference(path)
    tokens = O._tokens()
    prompt, greedy, margins = O._greedy_reference(model)
    return types.SimpleNamespace(family=family, path=path, model=model, tokens=tokens, prompt=prompt,
                                 logits=H.reference_logits(model, tokens), greedy=greedy, margins=margins)


@pytest.fixture(scope="module")
def hj():
    return importlib.import_module("hybrid_jax")


@pytest.fixture(scope="module")
def loaded(oracle, hj):
    cfg, params = hj.load_pretrained(oracle.path, dtype="float32")
    assert cfg.moe is not None and "moe" in cfg.sublayers
    return cfg, params


@pytest.fixture(scope="module")
def jax_logits(oracle, hj, loaded):
    cfg, params = loaded
    with O._exact_matmuls():
        return np.asarray(hj.forward(params, cfg, oracle.tokens), dtype=np.float32)


def test_moe_forward_matches_hf(oracle, jax_logits):
    err = O._rel_err(jax_logits, oracle.logits)
    assert err <= MAX_REL_ERR, f"{oracle.family}: max rel err {err:.3e}"


def test_moe_greedy_matches_hf(oracle, hj, loaded):
    cfg, params = loaded
    with O._exact_matmuls():
        got = [int(t) for t in hj.generate_greedy(params, cfg, list(oracle.prompt), O.N_NEW)]
    assert got == oracle.greedy, (got, oracle.greedy, min(oracle.margins))


def test_moe_piecewise_prefill_then_decode_matches_forward(oracle, loaded, jax_logits):
    """The first 32 tokens of row 0 in pieces, then its last 8 tokens decoded one by one (teacher forcing), give
    the uncached forward's logits of all 40 positions. Same cache shape and block size as generate_greedy, so the
    decode program is shared; the pieces still cross block (16) and chunk (16) boundaries mid-piece."""
    from hybrid_jax.generate import SingleSequence

    cfg, params = loaded
    toks = [int(t) for t in oracle.tokens[0]]
    with O._exact_matmuls():
        seq = SingleSequence(params, cfg, O.PROMPT_LEN + O.N_NEW)
        pieces, at = [], 0
        for size in (1, 7, 13, 11):
            pieces.append(np.asarray(seq.extend(toks[at:at + size], all_logits=True)))
            at += size
        decoded = [np.asarray(seq.step(t)) for t in toks[32:39]]
    assert O._rel_err(np.concatenate(pieces), jax_logits[0, :32]) <= MAX_REL_ERR
    assert O._rel_err(np.stack(decoded), jax_logits[0, 32:39]) <= MAX_REL_ERR


def test_moe_export_writes_the_checkpoint_back(oracle, loaded, tmp_path):
    """hybrid_jax.export.save_pretrained writes the MoE layers under the same names and layouts transformers
    saved (per-expert NemotronH tensors, fused Granite input_linear), and loading that gives the same params."""
    import json

    from safetensors.numpy import load_file

    from hybrid_jax import load_pretrained
    from hybrid_jax.export import save_pretrained

    cfg, params = loaded
    with open(f"{oracle.path}/config.json") as f:
        hf = json.load(f)
    out = save_pretrained(params, hf, str(tmp_path / "export"))
    theirs, ours = load_file(f"{oracle.path}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, a in theirs.items():
        np.testing.assert_array_equal(ours[name], a, err_msg=name)
    _, again = load_pretrained(out, dtype="float32")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- oracle only


def test_oracle_moe_cached_decode_matches_recompute(oracle):
    assert H.reference_greedy(oracle.model, oracle.prompt, O.N_NEW, use_cache=True) == oracle.greedy


def test_oracle_moe_logits_are_discriminating(oracle):
    assert oracle.logits.std() > 0.4
    assert len(set(oracle.greedy)) > O.N_NEW // 2


@torch.no_grad()
def test_oracle_moe_every_parameter_and_router_bias_matter(oracle):
    """Scaling any parameter tensor by 1.05 (or zeroing the router correction bias, which only changes which
    experts are chosen) moves the logits by more than 2 * MAX_REL_ERR; the tokens of the test use at least 7 of
    the 8 experts of every MoE layer."""
    model, tokens = oracle.model, oracle.tokens
    base = H.reference_logits(model, tokens)
    weak = []
    for name, p in model.named_parameters():
        saved = p.detach().clone()
        p.mul_(1.05)
        err = O._rel_err(H.reference_logits(model, tokens), base)
        p.copy_(saved)
        if err <= 2 * MAX_REL_ERR:
            weak.append((name, err))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            saved = b.detach().clone()
            b.zero_()
            err = O._rel_err(H.reference_logits(model, tokens), base)
            b.copy_(saved)
            if err <= 2 * MAX_REL_ERR:
                weak.append((name, err))
    assert not weak, weak
    used = []
    routers = [m for m in model.modules() if type(m).__name__ in ("NemotronHTopkRouter", "GraniteMoeHybridTopKRouter")]
    assert routers
    hooks = [r.register_forward_hook(lambda m, i, out: used.append(set(out[2].flatten().tolist()))) for r in routers]
    H.reference_logits(model, tokens)
    for h in hooks:
        h.remove()
    assert min(len(u) for u in used) >= 7, used
