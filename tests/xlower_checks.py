"""Cross-lowering of the engine's programs for a platform that is not present (used by
tests/test_cross_lowering.py, in its own process for tensor parallel 4: XLA must see 4 host devices, which can only
be set before jax initialises).

    python tests/xlower_checks.py TP OUT_JSON CONFIG.json:PLATFORM ... [CHECKPOINT_DIR ...]

Each program is exported with `jax.export.export(fn, platforms=(platform,))` from shapes only (`abstract_model`,
`abstract_cache`): the serving prefill and decode steps exactly as `ModelRunner.lowered` lowers them (params,
cache, packed ints, floats, grammar masks, bias, and for decode the previous step's tokens), the cache's copies
(ledger's copy_block_in_place / copy_slot_in_place) and the host tier's moves (offload's gather_arrays /
scatter_arrays). Kernels: on cuda `HYBRID_KERNELS=pallas` (the Triton kernels, lowered for real; the prefill and
decode steps must contain them); on tpu `auto` (the kernels are Triton-only, so the jnp references).
Lowering only, nothing is compiled. A result names the program, its shape and the platform. A checkpoint
directory among the arguments compares `abstract_model` with what the loader and `shard_model` give for it.
"""
from __future__ import annotations

import json
import os
import re
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from hybrid_jax import ledger as L  # noqa: E402
from hybrid_jax import offload  # noqa: E402
from hybrid_jax.abstract import abstract_cache, abstract_model  # noqa: E402
from hybrid_jax.fused import make_serving_steps  # noqa: E402
from hybrid_jax.memory import plan_cache  # noqa: E402
from pallas_kernels import ops  # noqa: E402
from serving.model_runner import ModelRunner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON = "__gpu$xla.gpu.triton"
KERNELS = {"cuda": "pallas", "tpu": "auto"}
# The engine's defaults (serving/engine.py) but for a longer context: 8 sequences, prefill chunks of up to 256
# tokens in up to 4 rows, 16-token blocks, 8192-token sequences (block tables of up to 512 blocks).
SERVING = dict(max_num_seqs=8, max_prefill_tokens=256, max_prefill_rows=4, block_size=16, max_model_len=8192)
# (kind, rows, tokens, table width): the smallest decode bucket, the widest decode rows over the widest table, one
# prefill chunk of the full token bucket in the full rows
STEP_SHAPES = (("decode", 2, 1, 4), ("decode", 8, 1, 512), ("prefill", 4, 256, 16))
MOVE_WIDTHS = (1, 512)  # offload's padded block counts: one block, a full-length sequence


class _Caches:
    """What ModelRunner reads of the cache manager: the block size and the (here abstract) cache."""

    def __init__(self, cache):
        self.cache, self.block_size = cache, cache.block_size


def _struct(x):
    """x's shape and dtype, with its sharding when that is over the tensor parallel mesh (a host array, or one on
    the default device, has none: the program's own platform places it)."""
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding if isinstance(sharding, NamedSharding)
                                else None)


def _disabled():
    return [jax.export.DisabledSafetyCheck.custom_call(TRITON)]


def _export(fn, platform, *args, **kw):
    return jax.export.export(fn, platforms=(platform,), disabled_checks=_disabled())(*args, **kw)


def setup(config_path: str, tp: int):
    """(cfg, abstract params, abstract cache, runner, table width) at the real shapes of a config, bf16."""
    with open(config_path) as f:
        config = json.load(f)
    cfg, params = abstract_model(config, "bfloat16", tp)
    s = SERVING
    plan = plan_cache(cfg, dtype=jnp.bfloat16, block_size=s["block_size"], max_model_len=s["max_model_len"],
                      max_num_seqs=s["max_num_seqs"])
    cache = abstract_cache(cfg, num_blocks=plan.num_blocks, block_size=plan.block_size, num_slots=plan.num_slots,
                           dtype=jnp.bfloat16)
    width = L.blocks_for(s["max_model_len"], s["block_size"])
    runner = ModelRunner(cfg, params, _Caches(cache), max_num_seqs=s["max_num_seqs"],
                         max_prefill_tokens=s["max_prefill_tokens"], max_prefill_rows=s["max_prefill_rows"],
                         table_width=width, adjust=None)
    return cfg, params, cache, runner, width


def _step(runner, params, cache, platform, kind, rows, T, width):
    """Export one serving step as ModelRunner.lowered lowers it (its scratch inputs, as shapes)."""
    ints, floats, masks, bias = runner._scratch(rows, T, width)
    args = [params, cache, _struct(ints), _struct(floats), _struct(masks), _struct(bias)]
    if kind == "decode":
        return _export(runner._decode, platform, *args, _struct(runner._no_prev))
    return _export(runner._prefill, platform, *args, T=T)


def programs(config_path: str, platform: str, tp: int):
    """[(program name, shape text, thunk exporting it)] of a config for a platform."""
    cfg, params, cache, runner, width = setup(config_path, tp)
    assert {s for s in STEP_SHAPES} <= set(runner.shapes()), "STEP_SHAPES must be buckets the engine compiles"
    out = []
    for kind, rows, T, w in STEP_SHAPES:
        out.append((f"{kind} step", f"rows={rows} tokens={T} table={w}",
                    lambda k=kind, r=rows, t=T, w=w: _step(runner, params, cache, platform, k, r, t, w)))
    one = _struct(L.host_ids(0))  # the cache manager passes host int32 id vectors
    out.append(("copy_block_in_place", "1 block", lambda: _export(L.copy_block_in_place, platform, cache, one, one)))
    out.append(("copy_slot_in_place", "1 slot", lambda: _export(L.copy_slot_in_place, platform, cache, one, one)))
    slot = jax.ShapeDtypeStruct((), jnp.int32, weak_type=True)  # a Python int
    for n in MOVE_WIDTHS:
        idx = _struct(offload.padded_ids(range(n)))
        moved = [_struct(a) for a in jax.eval_shape(offload.gather_arrays, cache, idx, slot)]  # host numpy
        out.append(("gather_arrays", f"{n} blocks",
                    lambda idx=idx: _export(offload.gather_arrays, platform, cache, idx, slot)))
        out.append(("scatter_arrays", f"{n} blocks",
                    lambda idx=idx, moved=moved: _export(offload.scatter_arrays, platform, cache, idx, slot,
                                                         *moved)))
    return out


def kernels(exported) -> list[str]:
    """The names of the Triton kernels (pallas_call names) in an exported program."""
    return sorted({m for line in exported.mlir_module().splitlines() if TRITON in line
                   for m in re.findall(r'\bname = "(\w+)"', line)})


def lower(config_path: str, platform: str, tp: int) -> list[dict]:
    """Export every program of `programs` with the platform's kernels; one result per program: {"program",
    "shape", "platform", "tp", "config", "error" (None when it lowered), "kernels" (the Triton kernels in it),
    "devices" (the exported program's device count)}."""
    before = os.environ.get("HYBRID_KERNELS")
    os.environ["HYBRID_KERNELS"] = KERNELS[platform]
    jax.clear_caches()  # the kernel choice is made at trace time: no trace of another platform's choice is reused
    make_serving_steps.cache_clear()
    results = []
    try:
        with ops.lowering_for(platform):
            for name, shape, thunk in programs(config_path, platform, tp):
                r = {"program": name, "shape": shape, "platform": platform, "tp": tp,
                     "config": os.path.basename(config_path), "error": None, "kernels": [], "devices": None}
                try:
                    exported = thunk()
                    r["kernels"], r["devices"] = kernels(exported), exported.nr_devices
                except Exception as e:  # noqa: BLE001 - reported with the program, the shape and the platform
                    r["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                results.append(r)
    finally:
        if before is None:
            os.environ.pop("HYBRID_KERNELS", None)
        else:
            os.environ["HYBRID_KERNELS"] = before
        jax.clear_caches()
        make_serving_steps.cache_clear()
    return results


def abstract_mismatches(model_dir: str, tp: int) -> list[str]:
    """Where abstract_model differs from the params the loader and shard_model give for a checkpoint at tp
    (shape, dtype, partition spec per leaf); [] when identical."""
    import hybrid_jax
    from hybrid_jax.loader import read_config
    from hybrid_jax.sharding import shard_model

    cfg, params = hybrid_jax.load_pretrained(model_dir, dtype="bfloat16", stacked=True, on_host=tp > 1)
    tcfg, placed = shard_model(cfg, params, tp)
    acfg, abstract = abstract_model(read_config(model_dir), "bfloat16", tp)

    def desc(a):
        spec = getattr(a.sharding, "spec", None) if tp > 1 else None
        return a.shape, str(a.dtype), str(spec)
    got = dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(desc, abstract, is_leaf=_is_struct),
                                                   is_leaf=lambda x: isinstance(x, tuple)))
    want = dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(desc, placed),
                                                    is_leaf=lambda x: isinstance(x, tuple)))
    out = [] if acfg == tcfg else [f"tp {tp}: config {acfg} != {tcfg}"]
    for path in sorted(set(got) | set(want), key=str):
        if got.get(path) != want.get(path):
            out.append(f"tp {tp}: {jax.tree_util.keystr(path)}: abstract {got.get(path)}, loaded {want.get(path)}")
    return out


# A config's widths shrunk (keys it has), its layer kinds kept: a checkpoint of the same family and layout to
# compare abstract_model with the loader on.
SMALL = {"hidden_size": 64, "vocab_size": 272, "intermediate_size": 64, "head_dim": 16, "num_attention_heads": 8,
         "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "mamba_n_heads": 8, "mamba_d_head": 16,
         "mamba_d_state": 16, "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48,
         "n_routed_experts": 8, "num_experts_per_tok": 2, "shared_intermediate_size": 64}


def small_checkpoint(config_path: str, out_dir: str) -> str:
    """A random checkpoint of the config shrunk by SMALL to 6 layers covering its layer kinds."""
    from hybrid_jax.random_checkpoint import write_random_checkpoint

    with open(config_path) as f:
        config = json.load(f)
    config.update({k: v for k, v in SMALL.items() if k in config})
    return write_random_checkpoint(config, out_dir, num_layers=6, cover_kinds=True)


def _is_struct(x):
    return isinstance(x, jax.ShapeDtypeStruct)


def main(tp: int, out_path: str, cases: list[str]) -> None:
    """cases: CONFIG.json:PLATFORM to lower at tp, or a checkpoint directory whose abstract model is compared with
    the loaded one at tp."""
    assert jax.device_count() >= tp, jax.devices()
    results, mismatches = [], []
    for case in cases:
        if os.path.isdir(case):
            mismatches += abstract_mismatches(case, tp)
            continue
        config_path, platform = case.rsplit(":", 1)
        results += lower(config_path, platform, tp)
    with open(out_path, "w") as f:
        json.dump({"results": results, "abstract_mismatches": mismatches}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
