"""Time the plain-jnp references against the Pallas kernels for every op in `pallas_kernels.ops`.

Real shapes are those of NVIDIA-Nemotron-Nano-9B-v2: Mamba2 heads 128, head_dim 80, n_groups 8, d_state 128,
conv kernel 4 (conv channels 128 * 80 + 2 * 8 * 128 = 12288), chunk 128; attention 40 query heads, 8 kv heads,
head_dim 128. Each function is jitted, warmed up (compile + `--warmup` calls), then timed `--iters` times with
`block_until_ready`; the median (and min / p90) in milliseconds goes to a JSON file, with the max error of the
kernel against the reference on the same inputs.

On the H100 (see docs/kernels.md):
    python bench/bench_kernels.py --out docs/benchmarks/kernels.json
On CPU, to check that the script works (tiny shapes, Pallas in interpret mode, numbers meaningless):
    python bench/bench_kernels.py --tiny
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import conv1d, paged_attention, reference, ssd, ssm_update  # noqa: E402

REAL = dict(H=128, P=80, G=8, N=128, W=4, L=128, Hq=40, K=8, D=128, page=16)
TINY = dict(H=4, P=16, G=2, N=16, W=4, L=16, Hq=4, K=2, D=16, page=4)


def _cases(tiny: bool):
    """(op, label, params) for every benchmarked configuration."""
    if tiny:
        return [
            ("ssd_scan", "B1_T64", dict(B=1, T=64, chunk_states=False)),
            ("ssd_scan", "B2_T32_states", dict(B=2, T=32, chunk_states=True)),
            ("ssm_decode_step", "B4", dict(B=4)),
            ("causal_conv1d", "B2_T40", dict(B=2, T=40)),
            ("causal_conv1d_step", "B4", dict(B=4)),
            ("paged_prefill_attention", "B2_T16_prefix20", dict(B=2, T=16, prefix=20)),
            ("paged_decode_attention", "B4_kv37", dict(B=4, kv=37, ragged=True)),
        ]
    return [
        ("ssd_scan", "B1_T4096", dict(B=1, T=4096, chunk_states=False)),
        ("ssd_scan", "B1_T4096_states", dict(B=1, T=4096, chunk_states=True)),
        ("ssd_scan", "B8_T512", dict(B=8, T=512, chunk_states=False)),
        ("ssm_decode_step", "B1", dict(B=1)),
        ("ssm_decode_step", "B32", dict(B=32)),
        ("ssm_decode_step", "B128", dict(B=128)),
        ("causal_conv1d", "B1_T4096", dict(B=1, T=4096)),
        ("causal_conv1d", "B8_T512", dict(B=8, T=512)),
        ("causal_conv1d_step", "B1", dict(B=1)),
        ("causal_conv1d_step", "B32", dict(B=32)),
        ("causal_conv1d_step", "B128", dict(B=128)),
        ("paged_prefill_attention", "B1_T2048_prefix2048", dict(B=1, T=2048, prefix=2048)),
        ("paged_prefill_attention", "B4_T512_prefix1024", dict(B=4, T=512, prefix=1024)),
        ("paged_decode_attention", "B1_kv4096", dict(B=1, kv=4096, ragged=False)),
        ("paged_decode_attention", "B32_kv4096", dict(B=32, kv=4096, ragged=False)),
        ("paged_decode_attention", "B64_kv1to8192", dict(B=64, kv=8192, ragged=True)),
    ]


def _sweep(op: str, tiny: bool):
    """Kernel tiling variants tried with --sweep (the first one is the default)."""
    if tiny:
        return [{}]
    return {
        "ssd_scan": [{}, dict(block_p=32), dict(num_warps=4)],
        "ssm_decode_step": [{}, dict(block_p=16, num_warps=2)],
        "causal_conv1d": [{}, dict(block_t=128, block_c=64), dict(block_t=32, block_c=256)],
        "causal_conv1d_step": [{}, dict(block_c=1024, num_warps=8)],
        "paged_prefill_attention": [{}, dict(block_q=128, block_k=64, num_warps=8), dict(block_k=128)],
        "paged_decode_attention": [{}, dict(block_k=128), dict(block_k=256, num_warps=8)],
    }[op]


def _inputs(op: str, p: dict, dims: dict, rng: np.random.Generator):
    """(args, kwargs) shared by the reference and the kernel."""
    bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    H, P, G, N, W, L = (dims[k] for k in ("H", "P", "G", "N", "W", "L"))

    def rnd(shape, dtype, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    A = -jnp.asarray(rng.uniform(0.5, 4.0, (H,)).astype(np.float32))
    if op == "ssd_scan":
        B, T = p["B"], p["T"]
        dt = jnp.asarray(rng.uniform(0.001, 0.1, (B, T, H)).astype(np.float32))
        args = (rnd((B, T, H, P), bf16), dt, A, rnd((B, T, G, N), bf16, 0.3), rnd((B, T, G, N), bf16, 0.3),
                rnd((B, H, P, N), f32, 0.1))
        return args, dict(chunk_size=L, return_chunk_states=p["chunk_states"])
    if op == "ssm_decode_step":
        B = p["B"]
        dt = jnp.asarray(rng.uniform(0.001, 0.1, (B, H)).astype(np.float32))
        return (rnd((B, H, P, N), f32, 0.1), rnd((B, H, P), bf16), dt, A, rnd((B, G, N), bf16, 0.3),
                rnd((B, G, N), bf16, 0.3)), {}
    C = H * P + 2 * G * N
    if op == "causal_conv1d":
        B, T = p["B"], p["T"]
        lengths = jnp.asarray(rng.integers(1, T + 1, (B,)).astype(np.int32)).at[0].set(T)
        return (rnd((B, T, C), bf16), rnd((B, C, W - 1), bf16), rnd((C, W), bf16, 0.5), rnd((C,), bf16),
                lengths), {}
    if op == "causal_conv1d_step":
        B = p["B"]
        return (rnd((B, C), bf16), rnd((B, C, W - 1), bf16), rnd((C, W), bf16, 0.5), rnd((C,), bf16)), {}
    Hq, K, D, S = dims["Hq"], dims["K"], dims["D"], dims["page"]
    scale = D ** -0.5
    if op == "paged_prefill_attention":
        B, T, prefix = p["B"], p["T"], p["prefix"]
        kv = prefix + T
        M = -(-kv // S)
        n_pages = B * M
        bt = jnp.asarray(rng.permutation(n_pages).reshape(B, M).astype(np.int32))
        q_pos = jnp.broadcast_to(jnp.arange(prefix, kv, dtype=i32), (B, T))
        return (rnd((B, T, Hq, D), bf16), rnd((n_pages, S, K, D), bf16), rnd((n_pages, S, K, D), bf16), bt, q_pos,
                jnp.full((B,), kv, i32)), dict(scale=scale)
    if op == "paged_decode_attention":
        B, kv = p["B"], p["kv"]
        M = -(-kv // S)
        n_pages = B * M
        bt = jnp.asarray(rng.permutation(n_pages).reshape(B, M).astype(np.int32))
        kv_len = (jnp.asarray(rng.integers(1, kv + 1, (B,)).astype(np.int32)) if p["ragged"]
                  else jnp.full((B,), kv, i32))
        return (rnd((B, Hq, D), bf16), rnd((n_pages, S, K, D), bf16), rnd((n_pages, S, K, D), bf16), bt,
                kv_len), dict(scale=scale)
    raise KeyError(op)


KERNELS = {"ssd_scan": ssd.ssd_scan, "ssm_decode_step": ssm_update.ssm_decode_step,
           "causal_conv1d": conv1d.causal_conv1d, "causal_conv1d_step": conv1d.causal_conv1d_step,
           "paged_prefill_attention": paged_attention.paged_prefill_attention,
           "paged_decode_attention": paged_attention.paged_decode_attention}


def _time(fn, args, warmup: int, iters: int):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))  # compile + first run
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return out, dict(median_ms=statistics.median(times), min_ms=times[0],
                     p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))], first_call_s=compile_s)


def _max_err(got, want):
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        errs.append(dict(max_abs=float(np.max(np.abs(g - w))) if g.size else 0.0,
                         max_ref=float(np.max(np.abs(w))) if w.size else 0.0))
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test; Pallas in interpret mode)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default docs/benchmarks/kernels.json, or /tmp/bench_kernels_tiny.json "
                         "with --tiny so that CPU numbers never land in docs/)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per function (default 50; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls after compile (default 5; 1 tiny)")
    ap.add_argument("--ops", default="", help="comma-separated subset of ops")
    ap.add_argument("--sweep", action="store_true", help="also time a few kernel tiling variants")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    tiny = args.tiny
    dims = TINY if tiny else REAL
    iters = args.iters or (3 if tiny else 50)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    out_path = args.out or ("/tmp/bench_kernels_tiny.json" if tiny else
                            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         "docs", "benchmarks", "kernels.json"))
    wanted = {s for s in args.ops.split(",") if s}
    backend = jax.default_backend()
    interpret = backend != "gpu"
    if interpret and not tiny:
        print("warning: no GPU backend; Pallas runs in interpret mode and real shapes will be very slow",
              file=sys.stderr)
    rng = np.random.default_rng(args.seed)

    results = []
    for op, label, params in _cases(tiny):
        if wanted and op not in wanted:
            continue
        fargs, kwargs = _inputs(op, params, dims, rng)
        ref_fn = jax.jit(functools.partial(getattr(reference, op), **kwargs))
        row = dict(op=op, case=label, params=params, ref=None, pallas=[])
        try:
            ref_out, row["ref"] = _time(ref_fn, fargs, warmup, iters)
        except Exception as e:  # e.g. out of memory for the materialising reference
            ref_out = None
            row["ref"] = dict(error=f"{type(e).__name__}: {e}"[:2000])
        for variant in (_sweep(op, tiny) if args.sweep else [{}]):
            entry = dict(variant=variant)
            try:
                k_fn = jax.jit(functools.partial(KERNELS[op], **kwargs, **variant, interpret=interpret))
                k_out, timing = _time(k_fn, fargs, warmup, iters)
                entry.update(timing)
                if ref_out is not None:
                    entry["errors"] = _max_err(k_out, ref_out)
                    entry["speedup_vs_ref"] = row["ref"]["median_ms"] / timing["median_ms"]
            except Exception as e:  # a kernel that fails to compile / run on this device is reported, not fatal
                entry["error"] = f"{type(e).__name__}: {e}"[:2000]
                entry["traceback"] = traceback.format_exc()[-4000:]
            row["pallas"].append(entry)
        results.append(row)
        ref_ms = row["ref"].get("median_ms")
        for entry in row["pallas"]:
            k_ms = entry.get("median_ms")
            print(f"{op:26s} {label:22s} ref {ref_ms if ref_ms is None else round(ref_ms, 3)!s:>9} ms   "
                  f"pallas{entry['variant'] or ''} {entry.get('error', 'ERR')[:60] if k_ms is None else round(k_ms, 3)}"
                  f"{'' if k_ms is None or ref_ms is None else f' ms  x{ref_ms / k_ms:.2f}'}", flush=True)

    # An op is a candidate for ops.MEASURED_FASTER_ON_GPU when its default kernel beats the reference in every case.
    faster = sorted(op for op in {r["op"] for r in results}
                    if all(r["pallas"][0].get("speedup_vs_ref", 0.0) > 1.0 for r in results if r["op"] == op))
    dev = jax.devices()[0]
    report = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        backend=backend, device_kind=getattr(dev, "device_kind", str(dev)), jax_version=jax.__version__,
        python=platform.python_version(), tiny=tiny, interpret=interpret, iters=iters, warmup=warmup, dims=dims,
        faster_on_this_device=faster,
        note=("CPU smoke run: interpret-mode timings are meaningless" if interpret else
              "candidates for pallas_kernels.ops.MEASURED_FASTER_ON_GPU: faster_on_this_device (default tiling)"),
        results=results)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"faster than the reference on {report['device_kind']}: {faster}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
