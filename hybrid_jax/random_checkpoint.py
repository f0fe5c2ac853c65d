"""Write random-weight checkpoints in the exact on-disk layout of the real Hugging Face checkpoints.

Supported architectures: ``nemotron_h`` (NemotronHForCausalLM: Nemotron-H, Nemotron Nano 2, Nemotron 3 with MoE
"E" layers), ``granitemoehybrid`` (GraniteMoeHybridForCausalLM: Granite 4.0-H dense and MoE) and ``bamba``
(BambaForCausalLM), with the tensor names, layouts and storage dtypes the released checkpoints use
(hybrid_jax/checkpoint_writer/plan.py lists them).

Tensors are generated one at a time, in chunks, in float32 with numpy and cast on the fly, and
streamed straight into the safetensors files, so memory stays bounded by the chunk size whatever
the model size. Checkpoints below ``max_shard_bytes`` go to one ``model.safetensors``; larger
ones to ``model-0000K-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.

Each tensor's values depend only on (seed, tensor name), so a truncated model shares the values
of the layers it keeps, and re-running with the same seed gives byte-identical files.

The parts live in hybrid_jax/checkpoint_writer/ (arch: the config dict's layers; plan: the tensors; values: their
values; files: the safetensors files); this module is their public face and the CLI::

    python -m hybrid_jax.random_checkpoint --config configs/models/X.json --out DIR \
        [--dtype bfloat16|float32|float16] [--seed 0] [--num-layers N [--cover-kinds]] \
        [--init-std 0.02] [--max-shard-size 2GB]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

from hybrid_jax.checkpoint_writer.arch import (UnsupportedConfigError, check_supported, layer_kinds, load_config,
                                               truncate_config)
from hybrid_jax.checkpoint_writer.files import shard_plan, write_safetensors
from hybrid_jax.checkpoint_writer.plan import TensorSpec, checkpoint_nbytes, plan_checkpoint
from hybrid_jax.checkpoint_writer.values import tensor_values
from hybrid_jax.config import FAMILIES as SUPPORTED_MODEL_TYPES
from hybrid_jax.weights_file import STORAGE_DTYPES, storage_dtype

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DEFAULT_MAX_SHARD_BYTES",
    "UnsupportedConfigError",
    "TensorSpec",
    "load_config",
    "layer_kinds",
    "truncate_config",
    "check_supported",
    "plan_checkpoint",
    "checkpoint_nbytes",
    "tensor_values",
    "write_random_checkpoint",
    "main",
]

DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3  # "2GB" in the Hugging Face sense
TOKENIZER_MARKER = "byte_tokenizer.json"
BYTE_VOCAB = 264  # the ids of serving's byte-level tokenizer (serving/tokenizer.py ByteTokenizer)


def _clear_stale_weights(out_dir: str) -> None:
    """Remove weights an earlier run left in out_dir: they would confuse loaders."""
    for fn in os.listdir(out_dir):
        if fn == "model.safetensors" or fn == "model.safetensors.index.json" or (
                fn.startswith("model-") and fn.endswith(".safetensors")):
            os.remove(os.path.join(out_dir, fn))


def _write_config(cfg: dict, out_dir: str, dtype: str) -> None:
    """config.json with the storage dtype recorded, and the byte tokenizer marker where it applies."""
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    if int(cfg.get("vocab_size", 0)) >= BYTE_VOCAB and not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        with open(os.path.join(out_dir, TOKENIZER_MARKER), "w") as f:  # serving reads its byte-level tokenizer
            f.write('{"type": "byte"}\n')


def _write_shards(specs: list[TensorSpec], out_dir: str, dtype: str, seed: int, init_std: float, cfg: dict,
                  max_shard_bytes: int) -> None:
    """model.safetensors, or the shards and their index when the tensors exceed max_shard_bytes."""
    shards = shard_plan(specs, dtype, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), specs, dtype, seed, init_std, cfg)
        return
    weight_map: dict[str, str] = {}
    n = len(shards)
    for k, shard in enumerate(shards, start=1):
        fn = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(out_dir, fn), shard, dtype, seed, init_std, cfg)
        for s in shard:
            weight_map[s.name] = fn
    index = {"metadata": {"total_parameters": sum(s.numel for s in specs),
                          "total_size": sum(s.nbytes(dtype) for s in specs)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def write_random_checkpoint(config: dict, out_dir, dtype: str = "bfloat16", seed: int = 0, init_std: float = 0.02,
                            *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, num_layers: int | None = None,
                            cover_kinds: bool = False) -> str:
    """Write ``out_dir/config.json`` and random weights in the real checkpoint layout, and (unless out_dir has a
    tokenizer.json, or the vocabulary is smaller) a ``byte_tokenizer.json`` marker: serving's byte-level
    tokenizer, ids 0-263, so the checkpoint serves as written; return ``out_dir``.

    ``config`` is a config.json dict (not modified). ``dtype`` is the storage dtype (bfloat16,
    float32 or float16; also recorded as ``torch_dtype`` in the written config). Tensors
    totalling more than ``max_shard_bytes`` are split over ``model-0000K-of-0000N.safetensors``
    with ``model.safetensors.index.json``; otherwise a single ``model.safetensors`` is written.
    ``num_layers`` (with ``cover_kinds``) truncates the layer list first, see truncate_config.
    Raises UnsupportedConfigError for unknown architectures or MoE configs missing their sizes.
    """
    dtype = storage_dtype(dtype)
    cfg = copy.deepcopy(config)
    if num_layers is not None:
        cfg = truncate_config(cfg, num_layers, cover_kinds=cover_kinds)
    specs = plan_checkpoint(cfg)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _clear_stale_weights(out_dir)
    _write_config(cfg, out_dir, dtype)
    _write_shards(specs, out_dir, dtype, seed, init_std, cfg, max_shard_bytes)
    return out_dir


def _parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    t = s.strip().upper()
    for unit, mult in (("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 1000**3), ("MB", 1000**2),
                       ("KB", 1000), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_jax.random_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config.json (file or directory) of the architecture")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(STORAGE_DTYPES),
                   help="storage dtype (default bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers (quick tests)")
    p.add_argument("--cover-kinds", action="store_true",
                   help="with --num-layers: make sure every layer kind of the full model is kept")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the normal init of matrices/embeddings")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES),
                   help="shard size limit, e.g. 2GB, 500MB, 1GiB or bytes (default 2GB)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
        if a.num_layers is not None:
            cfg = truncate_config(cfg, a.num_layers, cover_kinds=a.cover_kinds)
        specs = plan_checkpoint(cfg)
    except (UnsupportedConfigError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nparams = sum(s.numel for s in specs)
    nbytes = sum(s.nbytes(a.dtype) for s in specs)
    print(f"writing {len(specs)} tensors, {nparams / 1e6:.1f}M params, {nbytes / 1e9:.2f} GB ({a.dtype}) to {a.out}",
          file=sys.stderr)
    write_random_checkpoint(cfg, a.out, dtype=a.dtype, seed=a.seed, init_std=a.init_std,
                            max_shard_bytes=_parse_size(a.max_shard_size))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
