"""Host memory and time of loading a real-shaped random checkpoint: the peak resident memory a fresh process
adds while `hybrid_jax.load_pretrained` reads it (over what the jax runtime holds before), as a multiple of the
checkpoint's bytes, and the seconds it takes. Prints one line per checkpoint.

    python -m bench.bench_loading --config configs/models/granite-4.0-h-micro.json --num-layers 4 [--dtype bfloat16]
    python -m bench.bench_loading --checkpoint DIR      # an existing checkpoint

The checkpoint is written with `hybrid_jax.random_checkpoint` to a temporary folder (or --out, kept).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from hybrid_jax import random_checkpoint as rc
from hybrid_jax.weights_file import checkpoint_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MEASURE = """
import os, resource, sys, time
import jax, jax.numpy as jnp
import hybrid_jax
jax.block_until_ready(jnp.ones(4) + 1)
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
t = time.perf_counter()
cfg, params = hybrid_jax.load_pretrained(sys.argv[1], stacked=True)
jax.block_until_ready(params)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, time.perf_counter() - t)
"""


def measure(path: str) -> tuple[int, int, float]:
    """(checkpoint bytes, peak bytes added while loading, seconds) of loading `path` in a fresh process."""
    size = checkpoint_bytes(path)
    p = subprocess.run([sys.executable, "-c", _MEASURE, path], capture_output=True, text=True, cwd=ROOT,
                       check=True)
    peak, secs = p.stdout.split()[-2:]
    return size, int(peak), float(secs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="config.json of the architecture (configs/models/...)")
    ap.add_argument("--checkpoint", help="measure this checkpoint directory instead of writing one")
    ap.add_argument("--num-layers", type=int, default=None, help="keep the first N layers (all kinds covered)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--out", default=None, help="write the checkpoint here and keep it")
    args = ap.parse_args(argv)
    if bool(args.config) == bool(args.checkpoint):
        ap.error("give --config (a checkpoint is written) or --checkpoint")
    if args.checkpoint:
        what, (size, peak, secs) = args.checkpoint, measure(args.checkpoint)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = rc.write_random_checkpoint(rc.load_config(args.config), args.out or os.path.join(tmp, "ckpt"),
                                             dtype=args.dtype, num_layers=args.num_layers,
                                             cover_kinds=args.num_layers is not None)
            size, peak, secs = measure(out)
        what = f"{os.path.basename(args.config)} layers={args.num_layers or 'all'} {args.dtype}"
    print(f"{what}: checkpoint {size / 2**30:.2f} GiB, peak host memory while loading {peak / 2**30:.2f} GiB "
          f"(peak/checkpoint {peak / size:.3f}), {secs:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
