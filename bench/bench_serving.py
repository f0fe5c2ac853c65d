"""Serving benchmarks: multi-turn TTFT against history, decode tokens/s against the HBM roofline, and the cost of
attach + commit against history. Results go to docs/benchmarks/ as JSON, a markdown table and PNG plots.

    python -m bench.bench_serving all --config configs/models/nvidia-nemotron-nano-9b-v2.json --dtype bfloat16 \
        --histories 1024,4096,16384,32768 --suffixes 16,128 --batches 1,8,32,64 --bandwidth 3.0e12
    python -m bench.bench_serving all --tiny      # the embedded default model on CPU, small histories

`--config` writes a random-weight checkpoint of that shape first (no download). Each timed point is warmed up
once (compilation excluded) and reported as the median of --reps runs. The engine runs with its default kernels
(`HYBRID_KERNELS` selects them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import hybrid_jax
from hybrid_jax import ledger as L
from hybrid_jax.cache import init_cache
from hybrid_jax.memory import block_bytes, param_bytes, slot_bytes

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")


def _model_dir(args) -> str:
    if args.tiny or (args.model is None and args.config is None):
        from serving.engine import DEFAULT_MODEL_DIR
        return DEFAULT_MODEL_DIR
    if args.model:
        return args.model
    from hybrid_jax.random_checkpoint import load_config, write_random_checkpoint
    out = os.path.join(tempfile.gettempdir(), "bench_" + os.path.basename(args.config).removesuffix(".json"))
    if not os.path.exists(os.path.join(out, "config.json")):
        write_random_checkpoint(load_config(args.config), out, dtype=args.dtype, num_layers=args.num_layers)
    return out


def _engine(model_dir, args, mode, block_size, max_len, max_num_seqs=4):
    from serving import Engine
    return Engine.from_pretrained(model_dir, dtype=args.dtype, cache_mode=mode, block_size=block_size,
                                  max_model_len=max_len, max_num_seqs=max_num_seqs,
                                  max_prefill_tokens=args.prefill_chunk)


def _ttft(engine, cid, prompt):
    t0 = time.perf_counter()
    h = engine.complete_stream(prompt, conversation_id=cid, cache_salt="bench", max_tokens=1, temperature=0,
                               ignore_eos=True)
    next(iter(h))
    t = time.perf_counter() - t0
    h.result()
    return t


def bench_ttft(model_dir, args) -> list[dict]:
    rng = np.random.RandomState(0)
    rows = []
    histories = [int(x) for x in args.histories.split(",")]
    suffixes = [int(x) for x in args.suffixes.split(",")]
    max_len = max(histories) + 1024 + (args.reps + 2) * (max(suffixes) + 2) + 64
    for mode in args.modes.split(","):
        name, bs = (("align", int(mode[5:])) if mode.startswith("align") else (mode, args.block_size))
        eng = _engine(model_dir, args, name, bs, max_len)
        V = eng.cfg.vocab_size
        try:
            for H in histories:
                # Real committed lengths fall anywhere inside a block: add the same random tail (< 1024) to H
                # in every mode, so align pays for its unaligned remainder as it would in practice.
                tail = np.random.RandomState(H).randint(0, 1024)
                for S in suffixes:
                    cid = f"{mode}-{H}-{S}"
                    eng.complete(rng.randint(0, V, H + tail).tolist(), conversation_id=cid, cache_salt="bench",
                                 max_tokens=1, temperature=0, ignore_eos=True)
                    _ttft(eng, cid, rng.randint(0, V, S).tolist())  # warm-up: compiles this point's shapes
                    times = [_ttft(eng, cid, rng.randint(0, V, S).tolist()) for _ in range(args.reps)]
                    rows.append({"mode": mode, "history": H, "committed": H + tail, "suffix": S,
                                 "ttft_ms": 1e3 * statistics.median(times),
                                 "ttft_ms_all": [1e3 * t for t in times]})
                    print(f"ttft {mode:>10} history {H:>6} suffix {S:>4}: {rows[-1]['ttft_ms']:.1f} ms", flush=True)
                    eng.delete_conversation(cid, "bench")
        finally:
            eng.shutdown()
    return rows


def bench_decode(model_dir, args) -> list[dict]:
    rows = []
    ctx, steps = args.decode_context, args.decode_steps
    for B in [int(x) for x in args.batches.split(",")]:
        eng = _engine(model_dir, args, "none", args.block_size, ctx + steps + 16, max_num_seqs=B)
        V = eng.cfg.vocab_size
        try:
            def run():
                rng = np.random.RandomState(B)
                hs = [eng.complete_stream(rng.randint(0, V, ctx).tolist(), max_tokens=steps, temperature=0,
                                          ignore_eos=True) for _ in range(B)]
                firsts = []
                for h in hs:  # wait until every request is decoding
                    it = iter(h)
                    next(it)
                    firsts.append(it)
                t0 = time.perf_counter()
                n = sum(1 for it in firsts for _ in it)
                return n, time.perf_counter() - t0
            run()  # warm-up
            n, dt = run()
        finally:
            eng.shutdown()
        cfg = eng.cfg
        dtype = eng.params["embed"].dtype
        avg_ctx = ctx + steps / 2
        kv_read = B * avg_ctx * block_bytes(cfg, 1, dtype)
        state_rw = 2 * B * slot_bytes(cfg, dtype)
        step_bytes = param_bytes(eng.params) + kv_read + state_rw
        tok_s = n / dt
        step_s = B / tok_s
        roofline_step_s = step_bytes / args.bandwidth
        rows.append({"batch": B, "tokens_per_s": tok_s, "step_ms": 1e3 * step_s, "bytes_per_step": step_bytes,
                     "roofline_step_ms": 1e3 * roofline_step_s, "fraction_of_roofline": roofline_step_s / step_s,
                     "context": ctx})
        print(f"decode batch {B:>3}: {tok_s:.1f} tok/s, step {1e3 * step_s:.2f} ms, "
              f"roofline {1e3 * roofline_step_s:.3f} ms ({100 * roofline_step_s / step_s:.1f}%)", flush=True)
    return rows


def bench_attach(model_dir, args) -> list[dict]:
    """attach + commit of a conversation whose committed history is H tokens, on the real cache layout."""
    cfg, params = hybrid_jax.load_pretrained(model_dir, dtype=args.dtype)
    bs = args.block_size
    histories = [int(x) for x in args.histories.split(",")]
    nb = L.blocks_for(max(histories) + 1, bs) + 4
    cache = init_cache(cfg, num_blocks=nb + 1, block_size=bs, num_slots=4, dtype=params["embed"].dtype)
    rows = []
    for H in histories + [h + 1 for h in histories]:  # aligned and unaligned committed lengths
        led = L.new_ledger(nb + 1, 4, bs)
        led, cache, p = L.attach(led, cache, "c")
        led, p = L.reserve(led, p, H)
        led = L.commit(led, p, True, H)
        times = []
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            led2, cache, p = L.attach(led, cache, "c")
            led2 = L.commit(led2, p, True, H)
            jax.block_until_ready(cache)
            times.append(time.perf_counter() - t0)
        rows.append({"history": H, "attach_commit_ms": 1e3 * statistics.median(times[1:]),
                     "tail_copy": H % bs != 0})
        print(f"attach+commit history {H:>6}: {rows[-1]['attach_commit_ms']:.3f} ms", flush=True)
    return rows


def _plots(res: dict, stem: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if res.get("ttft"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        suffixes = sorted({r["suffix"] for r in res["ttft"]})
        for ax, S in zip(np.atleast_1d(axes), suffixes):
            for mode in dict.fromkeys(r["mode"] for r in res["ttft"]):
                pts = [(r["history"], r["ttft_ms"]) for r in res["ttft"] if r["mode"] == mode and r["suffix"] == S]
                ax.plot(*zip(*pts), marker="o", label=mode)
            ax.set(xscale="log", yscale="log", xlabel="history (tokens)", title=f"suffix {S} tokens")
            hs = sorted({r["history"] for r in res["ttft"]})
            ax.set_xticks(hs, [str(h) for h in hs])
            ax.minorticks_off()
        np.atleast_1d(axes)[0].set_ylabel("TTFT (ms)")
        np.atleast_1d(axes)[0].legend()
        fig.suptitle(f"Multi-turn TTFT, {res['model']} on {res['device']}")
        fig.tight_layout()
        fig.savefig(os.path.join(OUT_DIR, f"{stem}_ttft.png"), dpi=110)
    if res.get("decode"):
        fig, ax = plt.subplots(figsize=(5, 4))
        d = res["decode"]
        ax.plot([r["batch"] for r in d], [r["tokens_per_s"] for r in d], marker="o", label="measured")
        ax.plot([r["batch"] for r in d], [r["batch"] / (r["roofline_step_ms"] / 1e3) for r in d], "--",
                label="HBM roofline")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s", title="Decode throughput")
        ax.set_xticks([r["batch"] for r in d], [str(r["batch"]) for r in d])
        ax.minorticks_off()
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(OUT_DIR, f"{stem}_decode.png"), dpi=110)


def _markdown(res: dict) -> str:
    lines = [f"## {res['model']} on {res['device']} ({res['dtype']})", "", f"Command: `{res['command']}`", ""]
    if res.get("ttft"):
        lines += ["| mode | history | committed tokens | suffix | TTFT ms |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['mode']} | {r['history']} | {r['committed']} | {r['suffix']} | {r['ttft_ms']:.1f} |"
                  for r in res["ttft"]]
        lines.append("")
    if res.get("decode"):
        lines += [f"Bandwidth used for the roofline: {res['bandwidth'] / 1e9:.0f} GB/s", "",
                  "| batch | tokens/s | step ms | roofline step ms | % of roofline |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | {r['roofline_step_ms']:.3f} | "
                  f"{100 * r['fraction_of_roofline']:.1f} |" for r in res["decode"]]
        lines.append("")
    if res.get("attach"):
        lines += ["| committed history | tail copy | attach + commit ms |", "|---:|---|---:|"]
        lines += [f"| {r['history']} | {'yes' if r['tail_copy'] else 'no'} | {r['attach_commit_ms']:.3f} |"
                  for r in res["attach"]]
    return "\n".join(lines) + "\n"


def measure_copy_bandwidth() -> float:
    """Device copy bandwidth (bytes read + written per second) of a 256 MiB buffer."""
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        y = f(x)
    y.block_until_ready()
    return 2 * x.size * 4 * 5 / (time.perf_counter() - t0)


def replot(json_path: str) -> None:
    """Redraw the plots and the table of a saved result."""
    with open(json_path) as f:
        res = json.load(f)
    stem = os.path.basename(json_path).removesuffix(".json")
    _plots(res, stem)
    with open(os.path.join(OUT_DIR, f"{stem}.md"), "w") as f:
        f.write(_markdown(res))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("ttft", "decode", "attach", "all"))
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--config", help="config.json of a real shape: a random-weight checkpoint is written first")
    ap.add_argument("--num-layers", type=int, default=None, help="truncate the config's layer list")
    ap.add_argument("--tiny", action="store_true", help="the embedded default model (CPU-sized defaults)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--histories", default="256,512,1024,2048")
    ap.add_argument("--suffixes", default="16,128")
    ap.add_argument("--modes", default="none,align256,align1024,exact")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--decode-context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="bytes/s for the roofline (default: measured device copy bandwidth)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default=None, help="file stem under docs/benchmarks/")
    args = ap.parse_args(argv)
    model_dir = _model_dir(args)
    args.bandwidth = args.bandwidth or measure_copy_bandwidth()
    dev = jax.devices()[0]
    res = {"model": args.config or args.model or "default-tiny", "device": f"{dev.platform}:{dev.device_kind}",
           "dtype": args.dtype, "bandwidth": args.bandwidth, "jax": jax.__version__,
           "command": "python -m bench.bench_serving " + " ".join(argv if argv is not None else os.sys.argv[1:])}
    if args.what in ("ttft", "all"):
        res["ttft"] = bench_ttft(model_dir, args)
    if args.what in ("decode", "all"):
        res["decode"] = bench_decode(model_dir, args)
    if args.what in ("attach", "all"):
        res["attach"] = bench_attach(model_dir, args)
    os.makedirs(OUT_DIR, exist_ok=True)
    stem = args.name or f"{os.path.basename(str(res['model'])).removesuffix('.json')}_{dev.platform}"
    with open(os.path.join(OUT_DIR, f"{stem}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(OUT_DIR, f"{stem}.md"), "w") as f:
        f.write(_markdown(res))
    _plots(res, stem)
    print(_markdown(res))


if __name__ == "__main__":
    main()
