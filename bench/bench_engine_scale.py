"""The engine at scale: step cost against pool size, engine overhead per token, inter-token gaps while a long
prompt is admitted, and compile cost. Results: docs/benchmarks/<name>.json and .md.

    python -m bench.bench_engine_scale all --name engine-scale_cpu
    python -m bench.bench_engine_scale compile --name compile_cpu     # also runs on older checkouts (make_steps)

pool      decode (and 16-token prefill) step time of the functional API against the number of Mamba slots and
          KV blocks in the pool (16 .. 4,096), at batch 1, 2 and 8: flat when no step copies a pool.
overhead  wall time per decoded token through the public Engine against the bare jitted decode step at the
          same batch (1 and 8): the host's share.
itl       the longest and the median inter-token gap of 8 running streams while a 2,000-token prompt is
          admitted, against their gaps without it.
compile   time and number of compiled programs to warm up the step programs of the default model and of a
          56-layer model with the NVIDIA-Nemotron-Nano-9B-v2 layer pattern and small widths.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_seconds
import hybrid_jax
from hybrid_jax.cache import init_cache
from hybrid_jax.model import SpanBatch, make_steps

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")
DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "serving", "default_model")
NANO_PATTERN = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"


def _stacked(model_dir):
    cfg, params = hybrid_jax.load_pretrained(model_dir)
    if os.path.exists(os.path.join(os.path.dirname(hybrid_jax.__file__), "stack.py")):
        from hybrid_jax.stack import stack_layers
        params = stack_layers(params, cfg)
    return cfg, params  # an older checkout takes list-form params


def bench_pool(args) -> list[dict]:
    cfg, params = _stacked(DEFAULT_MODEL)
    prefill, _, decode = make_steps(cfg)
    rows = []
    for pool in (16, 256, 1024, 4096):
        cache = init_cache(cfg, num_blocks=pool, block_size=16, num_slots=pool)
        for B in (1, 2, 8):
            for kind, fn, T in (("decode", decode, 1), ("prefill16", prefill, 16)):
                batch = SpanBatch(jnp.ones((B, T), jnp.int32), jnp.full((B,), 5, jnp.int32),
                                  jnp.full((B,), T, jnp.int32), jnp.arange(1, B + 1, dtype=jnp.int32),
                                  jnp.tile(jnp.arange(1, 5, dtype=jnp.int32), (B, 1)))
                box = {"cache": cache}

                def run():
                    out, box["cache"] = fn(params, box["cache"], batch)
                    jax.block_until_ready(out)
                t = median_seconds(run, args.reps)
                cache = box["cache"]
                rows.append({"pool": pool, "batch": B, "step": kind, "ms": round(t * 1e3, 3)})
                print(rows[-1], flush=True)
    return rows


def bench_overhead(args) -> list[dict]:
    from serving import Engine
    cfg, params = _stacked(DEFAULT_MODEL)
    _, _, decode = make_steps(cfg)
    out = []
    for B in (1, 8):
        e = Engine.from_pretrained(None, max_num_seqs=8, max_model_len=2048)
        e.warmup(progress=False)
        n = 200
        prompts = [[65 + i] * 8 for i in range(B)]

        def engine_run():
            hs = [e.complete_stream(p, max_tokens=n, temperature=0, ignore_eos=True) for p in prompts]
            for h in hs:
                h.result()
        t_engine = median_seconds(engine_run, args.reps) / n
        e.shutdown()
        cache = init_cache(cfg, num_blocks=64, block_size=16, num_slots=16)
        rows = max(B, 2)  # the engine's smallest decode bucket
        batch = SpanBatch(jnp.ones((rows, 1), jnp.int32), jnp.full((rows,), 100, jnp.int32),
                          jnp.ones((rows,), jnp.int32), jnp.arange(1, rows + 1, dtype=jnp.int32),
                          jnp.tile(jnp.arange(1, 17, dtype=jnp.int32), (rows, 1)))
        box = {"cache": cache}

        def bare():
            for _ in range(n):
                logits, box["cache"] = decode(params, box["cache"], batch)
            jax.block_until_ready(logits)
        t_bare = median_seconds(bare, args.reps) / n
        out.append({"batch": B, "engine_ms_per_step": round(t_engine * 1e3, 3),
                    "bare_step_ms": round(t_bare * 1e3, 3), "ratio": round(t_engine / t_bare, 2)})
        print(out[-1], flush=True)
    return out


def bench_itl(args) -> dict:
    from serving import Engine
    e = Engine.from_pretrained(None, max_num_seqs=9, max_model_len=4096, max_prefill_tokens=args.prefill_chunk)
    e.warmup(progress=False)

    def gaps_of(long_prompt: bool) -> list[float]:
        stamps: dict[int, list[float]] = {i: [] for i in range(8)}
        handles = [e.complete_stream([70 + i] * 16, max_tokens=150, temperature=0, ignore_eos=True)
                   for i in range(8)]

        def read(i, h):
            for _ in h:
                stamps[i].append(time.perf_counter())
        ts = [threading.Thread(target=read, args=(i, h)) for i, h in enumerate(handles)]
        for t in ts:
            t.start()
        if long_prompt:
            time.sleep(0.05)
            e.complete(list(np.random.RandomState(0).randint(0, 256, 2000)), max_tokens=1, temperature=0)
        for t in ts:
            t.join()
        return [b - a for s in stamps.values() for a, b in zip(s[5:], s[6:])]  # past the streams' first tokens

    base, during = gaps_of(False), gaps_of(True)
    e.shutdown()
    res = {"prefill_chunk": args.prefill_chunk, "median_gap_ms": round(statistics.median(base) * 1e3, 3),
           "max_gap_ms_without": round(max(base) * 1e3, 3), "max_gap_ms_with_2000_token_prompt":
           round(max(during) * 1e3, 3)}
    res["max_gap_over_median"] = round(max(during) / statistics.median(base), 2)
    print(res, flush=True)
    return res


def _nano_pattern_model(tmp: str) -> str:
    from hybrid_jax.random_checkpoint import write_random_checkpoint
    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "models",
                           "nvidia-nemotron-nano-9b-v2.json")) as f:
        hf = json.load(f)
    hf.update(hidden_size=64, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, n_groups=1,
              ssm_state_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=264,
              chunk_size=16, torch_dtype="float32")
    hf.pop("attention_head_dim", None)
    write_random_checkpoint(hf, tmp, dtype="float32")
    return tmp


def bench_compile(args) -> list[dict]:
    """Compile the decode and 16/64/256-token prefill programs at batch 1, 2, 4 (twelve programs)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("default (6 layers)", DEFAULT_MODEL),
                           ("Nano-9B-v2 pattern (56 layers)", _nano_pattern_model(tmp))):
            cfg, params = _stacked(path)
            prefill, _, decode = make_steps(cfg)
            cache = init_cache(cfg, num_blocks=64, block_size=16, num_slots=16)
            t0, n = time.perf_counter(), 0
            for B in (1, 2, 4):
                for fn, T in ((decode, 1), (prefill, 16), (prefill, 64), (prefill, 256)):
                    batch = SpanBatch(jnp.ones((B, T), jnp.int32), jnp.zeros((B,), jnp.int32),
                                      jnp.ones((B,), jnp.int32), jnp.ones((B,), jnp.int32),
                                      jnp.ones((B, 16), jnp.int32))
                    fn.lower(params, cache, batch).compile()
                    n += 1
            secs = time.perf_counter() - t0
            out.append({"model": name, "sublayers": len(cfg.sublayers), "programs": n,
                        "compile_s": round(secs, 2)})
            print(out[-1], flush=True)
    return out


def _markdown(res: dict, cmd: str) -> str:
    lines = [f"# Engine at scale ({res['device']})", "", f"Command: `{cmd}`", "",
             f"Machine load (1-minute load average) before and after the run: {res['load']}. On a shared 2-core "
             "machine single timings move by tens of percent: read the trends.", ""]
    if "pool" in res:
        lines += ["## Step time against pool size (ms, median)", "", "| step | batch | " +
                  " | ".join(f"{p} slots" for p in sorted({r['pool'] for r in res['pool']})) + " |",
                  "|---|---|" + "---|" * len({r['pool'] for r in res['pool']})]
        for kind in ("decode", "prefill16"):
            for B in (1, 2, 8):
                cells = [str(r["ms"]) for r in res["pool"] if r["step"] == kind and r["batch"] == B]
                lines.append(f"| {kind} | {B} | " + " | ".join(cells) + " |")
        lines.append("")
    if "overhead" in res:
        lines += ["## Engine time per decoded token against the bare jitted step", "",
                  "| batch | engine ms/step | bare step ms | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['engine_ms_per_step']} | {r['bare_step_ms']} | {r['ratio']} |"
                  for r in res["overhead"]]
        lines.append("")
    if "itl" in res:
        r = res["itl"]
        lines += ["## Inter-token gaps of 8 streams while a 2,000-token prompt is admitted", "",
                  f"prefill chunk {r['prefill_chunk']} tokens: median gap {r['median_gap_ms']} ms, longest gap "
                  f"without the prompt {r['max_gap_ms_without']} ms, with it {r['max_gap_ms_with_2000_token_prompt']}"
                  f" ms ({r['max_gap_over_median']}x the median).", ""]
    if "compile" in res:
        lines += ["## Compile cost of twelve step programs (decode; prefill 16/64/256; batch 1/2/4)", "",
                  "| model | sublayers | programs | seconds |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['sublayers']} | {r['programs']} | {r['compile_s']} |"
                  for r in res["compile"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_engine_scale")
    p.add_argument("what", choices=("all", "pool", "overhead", "itl", "compile"))
    p.add_argument("--name", default=None, help="write docs/benchmarks/NAME.json and NAME.md")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prefill-chunk", type=int, default=256)
    args = p.parse_args(argv)
    res = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cores)"}
    load0 = os.getloadavg()[0]
    for what, fn in (("pool", bench_pool), ("overhead", bench_overhead), ("itl", bench_itl),
                     ("compile", bench_compile)):
        if args.what in ("all", what):
            res[what] = fn(args)
    res["load"] = f"{load0:.2f} / {os.getloadavg()[0]:.2f}"
    if args.name:
        cmd = "python -m bench.bench_engine_scale " + " ".join(argv if argv is not None else os.sys.argv[1:])
        with open(os.path.join(OUT_DIR, args.name + ".json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(OUT_DIR, args.name + ".md"), "w") as f:
            f.write(_markdown(res, cmd))


if __name__ == "__main__":
    main()
