"""One decode-sized and one prefill-sized matmul on this machine's default jax device, in float32, bfloat16, and
float32 activations against bfloat16 weights converted inside the program (what serving/cpu_dtype.py decides
between). Prints milliseconds and GFLOP/s.

    python -m bench.bench_cpu_dtype [--d 2048] [--f 8192] [--rows 1,64] [--reps 20]
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from bench.timing import median_seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--f", type=int, default=8192)
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    variants = {"float32": (jnp.float32, jnp.float32, lambda x, w: x @ w),
                "bfloat16": (jnp.bfloat16, jnp.bfloat16, lambda x, w: x @ w),
                "float32 x bfloat16 weights": (jnp.float32, jnp.bfloat16, lambda x, w: x @ w.astype(x.dtype))}
    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), [rows, {args.d}] x [{args.d}, {args.f}]")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (xt, wt, fn) in variants.items():
            x, w, f = jnp.ones((rows, args.d), xt), jnp.ones((args.d, args.f), wt), jax.jit(fn)
            secs = median_seconds(lambda: f(x, w).block_until_ready(), args.reps)
            gflops = 2 * rows * args.d * args.f / secs / 1e9
            print(f"rows {rows:4d}  {name:28s} {secs * 1e3:8.2f} ms  {gflops:7.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
