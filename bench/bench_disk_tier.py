"""Restoring a committed state from the disk tier (serving/disk_tier.py) against recomputing it, for
NVIDIA-Nemotron-Nano-9B-v2-shaped states (random weights, bfloat16), on this machine's CPU. Results:
docs/benchmarks/<name>.json and .md.

    python -m bench.bench_disk_tier --name disk_tier_cpu [--lengths 1024,8192,32768] [--parts engine,state]

engine  the real engine on a model with the Nano-9B-v2 config cut to one layer of each kind at full width (a Mamba2,
        an MLP and an attention layer; `random_checkpoint --num-layers 3 --cover-kinds`): a request of N tokens
        computed from scratch (recompute: its time to first token, compile time taken out), against a request of
        the same N tokens plus 16 new ones after that N-token state was evicted from the device, so it attaches
        it from the disk tier (read, check, install, then compute the 16 tokens), with the file's pages dropped
        from the page cache first (cold) and kept (warm), and against the same request with the state still on
        the device. Lengths above --max-recompute are not recomputed end to end (too slow on a CPU): their
        recompute is the sum of the measured prefill step times at each chunk's table width, and their state is
        planted with random contents.
state   the whole 56-layer Nano-9B-v2 state (4 attention layers of KV, 28 Mamba2 layers of conv and SSM state) at
        N tokens: the file's size, the time to read and check it (cold, warm) and to install it into a cache of
        the full model's shapes. No recompute is measured for 56 layers on a CPU (hours).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time

import jax
import numpy as np

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "models", "nvidia-nemotron-nano-9b-v2.json")
SUFFIX = 16
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/jaxpr_trace_duration")
_compile = {"s": 0.0}
_lock = threading.Lock()


def _on_event(name, secs, **_):
    if name in _COMPILE_EVENTS:
        with _lock:
            _compile["s"] += secs


def _compile_seconds() -> float:
    with _lock:
        return _compile["s"]


def _model_dir() -> str:
    from hybrid_jax.random_checkpoint import load_config, write_random_checkpoint
    out = os.path.join(tempfile.gettempdir(), "bench_nano9b_3layer_bf16")
    if not os.path.exists(os.path.join(out, "config.json")):
        write_random_checkpoint(load_config(CONFIG), out, dtype="bfloat16", num_layers=3, cover_kinds=True)
    with open(os.path.join(out, "byte_tokenizer.json"), "w") as f:
        json.dump({"type": "byte"}, f)  # ids are sent as ids; the byte tokenizer only renders the answer
    return out


def _drop_pages(path: str) -> None:
    """Drop a file's pages from the page cache (written and fsynced: clean), so the next read goes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _ttft(e, prompt, salt) -> tuple[float, float, int]:
    """(seconds to the first token, compile seconds in that time, cached tokens) of one request."""
    c0, t0 = _compile_seconds(), time.perf_counter()
    h = e.complete_stream(prompt, cache_salt=salt, max_tokens=1, temperature=0, ignore_eos=True)
    next(iter(h))
    t = time.perf_counter() - t0
    r = h.result()
    return t, _compile_seconds() - c0, r.cached_tokens


def _evict_all(e) -> None:
    def go():
        while e.caches.evict_one():
            pass
    e._call(go)


class _Timers:
    """Hooks on the engine's loop thread: each prefill step's seconds by table width (compile time taken out)
    and each read-back from the disk tier (read, check, install)."""

    def __init__(self, e):
        self.steps: dict[tuple, list[float]] = {}  # (tokens bucket, table width) -> seconds
        self.restores: list[float] = []
        runner, caches = e.runner, e.caches
        prefill, restore = runner.prefill, caches._restore_from_disk

        def timed_prefill(reqs, spans):
            c0, t0 = _compile_seconds(), time.perf_counter()
            out = prefill(reqs, spans)
            jax.block_until_ready((out, caches.cache))
            t, c = time.perf_counter() - t0, _compile_seconds() - c0
            if c == 0:
                width = runner.width(max(-(-e // runner.block_size) for _, e in spans))
                self.steps.setdefault((runner.tokens(max(e - s for s, e in spans)), width), []).append(t)
            return out

        def timed_restore(cid):
            t0 = time.perf_counter()
            ok = restore(cid)
            jax.block_until_ready(caches.cache)
            self.restores.append(time.perf_counter() - t0)
            return ok
        runner.prefill, caches._restore_from_disk = timed_prefill, timed_restore

    def composed(self, runner, n: int) -> float | None:
        """Seconds of the full prefill chunks covering n tokens, each at its own table width, from the step
        times measured (None when a width was not measured)."""
        chunk, total = runner.max_prefill_tokens, 0.0
        for end in range(chunk, n + 1, chunk):
            key = (chunk, runner.width(-(-end // runner.block_size)))
            if key not in self.steps:
                return None
            total += statistics.median(self.steps[key])
        return total


def _plant(e, tier, n: int, salt: str, rng) -> list[int]:
    """Store a state of n random tokens with random contents in the disk tier (the restore's cost does not
    depend on the values) and make the index know it: the way to time a restore whose recompute is too slow
    to run here."""
    from hybrid_jax.ledger import blocks_for
    from hybrid_jax.offload import HostTurn
    from serving.state_file import DiskEntry
    tokens = rng.randint(300, e.cfg.vocab_size, size=n).astype(np.int32)
    lay, nb = tier.format.layout, blocks_for(n, e.block_size)
    gen = np.random.default_rng(n)
    arrays = {a: _random(gen, [nb if d == -1 else d for d in lay[a][1]], lay[a][0]) for a in lay}
    host = HostTurn(n, arrays["k"], arrays["v"], arrays["conv"], arrays["ssm"])
    assert tier.submit(DiskEntry(tier.name_for(salt, _digest(tokens)), salt, tokens, None, False), host, host.nbytes)
    assert tier.flush(600)
    e._call(e.caches._index_disk)
    return tokens.tolist()


def bench_engine(args, lengths) -> list[dict]:
    from serving import Engine, disk_tier
    model_dir = _model_dir()
    cache_dir = tempfile.mkdtemp(prefix="bench_disk_tier_")
    e = Engine.from_pretrained(model_dir, dtype="bfloat16", block_size=256, max_model_len=max(lengths) + 512,
                               max_num_seqs=1, num_slots=4, max_prefill_tokens=args.prefill_chunk,
                               max_num_batched_tokens=args.prefill_chunk, host_cache_memory=0)
    tier = disk_tier.enable(e, cache_dir, 64 << 30)
    t0 = time.perf_counter()
    e.warmup(progress=False)  # as the server does: every step shape compiled and run once before timing
    print({"warmup_s": round(time.perf_counter() - t0, 1)}, flush=True)
    timers = _Timers(e)
    rng = np.random.RandomState(0)
    rows = []
    try:
        for n in lengths:
            salt = f"bench-{n}"
            row = {"tokens": n}
            if n <= args.max_recompute:
                prompt = rng.randint(300, e.cfg.vocab_size, size=n).tolist()
                t, c, cached = _ttft(e, prompt, salt)
                assert cached == 0
                row.update(recompute_s=round(t - c, 3), recompute_compile_s=round(c, 3), recompute="measured")
                assert tier.flush(600)
            else:
                prompt = _plant(e, tier, n, salt, rng)
                row["recompute"] = "composed"
            path = tier._path(tier.name_for(salt, _digest(prompt)))
            row["file_mib"] = round(os.path.getsize(path) / 2**20, 1)
            ttft, restore = {}, {}
            for kind in ["first"] + ["cold"] * args.reps + ["warm"] * args.reps + ["device"] * args.reps:
                assert tier.flush(600)  # the previous request's state, written behind, is on disk
                if kind != "device":
                    _evict_all(e)
                if kind in ("first", "cold"):
                    _drop_pages(path)
                n_restores = len(timers.restores)
                t, c, cached = _ttft(e, prompt + rng.randint(300, 20000, size=SUFFIX).tolist(), salt)
                assert cached == n, (cached, n)
                ttft.setdefault(kind, []).append(t - c)
                if len(timers.restores) > n_restores:
                    restore.setdefault(kind, []).append(timers.restores[-1])
            for kind in ("cold", "warm", "device"):
                row[f"hit_{kind}_s"] = round(statistics.median(ttft[kind]), 3)
            for kind in ("cold", "warm"):
                row[f"read_install_{kind}_s"] = round(statistics.median(restore[kind]), 3)
            rows.append(row)
            print(row, flush=True)
        big = [r for r in rows if r["recompute"] == "composed"]
        if big:  # full chunks at the widest table, after a planted state just short of the longest length
            n = max(r["tokens"] for r in big) - 2 * args.prefill_chunk
            prompt = _plant(e, tier, n, "bench-chunks", rng)
            for _ in range(args.reps):
                _evict_all(e)
                _ttft(e, prompt + rng.randint(300, 20000, size=2 * args.prefill_chunk).tolist(), "bench-chunks")
        for r in rows:
            composed = timers.composed(e.runner, r["tokens"])
            r["composed_s"] = None if composed is None else round(composed, 3)
            if r["recompute"] == "composed":
                r["recompute_s"] = r["composed_s"]
            ok = r["recompute_s"] is not None
            for kind in ("cold", "warm"):
                r[f"ratio_{kind}"] = round(r["recompute_s"] / r[f"hit_{kind}_s"], 1) if ok else None
            r["ratio_read_install_warm"] = round(r["recompute_s"] / r["read_install_warm_s"], 1) if ok else None
        steps = {f"{t} tokens, width {w}": round(statistics.median(v), 3) for (t, w), v in sorted(timers.steps.items())}
        print(steps)
    finally:
        e.shutdown()
        tier.close()
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rows, steps


def _digest(ids):
    from serving.checkpoints import digest
    return digest(np.asarray(ids, np.int32))


def _random(rng, shape, dtype) -> np.ndarray:
    if dtype.itemsize == 2:  # random bf16 values without a float32 copy of the whole array
        bits = rng.integers(0x3c00, 0x4000, size=shape, dtype=np.uint16)
        return bits.view(dtype)
    return rng.standard_normal(shape, np.float32).astype(dtype)


def bench_state(args, lengths) -> list[dict]:
    """The full model's state: write, read and check (cold, warm), install; no engine, no weights."""
    import jax.numpy as jnp

    from hybrid_jax import ledger as L
    from hybrid_jax import offload
    from hybrid_jax.cache import init_cache
    from hybrid_jax.config import from_hf
    from serving.state_file import DiskEntry, StateFormat, layout_of
    with open(CONFIG) as f:
        cfg = from_hf(json.load(f))
    bs = 256
    width = L.blocks_for(max(lengths), bs)
    cache = init_cache(cfg, num_blocks=width + 2, block_size=bs, num_slots=2, dtype=jnp.bfloat16)
    fmt = StateFormat("0" * 64, layout_of(cache), bs, width)
    directory = tempfile.mkdtemp(prefix="bench_state_")
    rng = np.random.default_rng(0)
    rows = []
    try:
        for n in lengths:
            nb = L.blocks_for(n, bs)
            lay = fmt.layout
            arrays = {a: _random(rng, [nb if d == -1 else d for d in lay[a][1]], lay[a][0]) for a in lay}
            host = offload.HostTurn(n, arrays["k"], arrays["v"], arrays["conv"], arrays["ssm"])
            tokens = rng.integers(0, cfg.vocab_size, n).astype(np.int32)
            entry = DiskEntry(fmt.name("s", _digest(tokens)), "s", tokens, None, False)
            t0 = time.perf_counter()
            size = fmt.write(directory, entry, host)
            write_s = time.perf_counter() - t0
            path = os.path.join(directory, entry.name)
            cold, warm = [], []
            for kind, out in [("cold", cold)] * args.reps + [("warm", warm)] * args.reps:
                if kind == "cold":
                    _drop_pages(path)
                t0 = time.perf_counter()
                got = fmt.load(path, "s", tokens)
                out.append(time.perf_counter() - t0)
            led = L.new_ledger(width + 2, 2, bs)
            installs = []
            for i in range(args.reps + 1):  # the first compiles the scatter for this width
                t0 = time.perf_counter()
                led2, cache = offload.from_host(led, cache, 1, got)
                jax.block_until_ready(cache)
                installs.append(time.perf_counter() - t0)
            rows.append({"tokens": n, "file_mib": round(size / 2**20, 1), "write_s": round(write_s, 3),
                         "read_check_cold_s": round(statistics.median(cold), 3),
                         "read_check_warm_s": round(statistics.median(warm), 3),
                         "install_s": round(statistics.median(installs[1:]), 3)})
            print(rows[-1], flush=True)
            os.remove(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def _markdown(result) -> str:
    out = [f"# Disk tier: restore against recompute ({result['device']})", "",
           f"Command: `{result['command']}` (bench/bench_disk_tier.py; its docstring says what each part does)", "",
           f"Machine: {result['machine']}; load average before {result.get('load_average_before')}, after "
           f"{result.get('load_average_after')} (the machine is shared: other work slows both sides alike).", ""]
    if result.get("engine"):
        out += ["## Engine: Nano-9B-v2 layer shapes, one layer of each kind (Mamba2, MLP, attention), bf16", "",
                "Random weights; the NVIDIA-Nemotron-Nano-9B-v2 config cut to 3 layers, one of each kind, at full "
                "width (hidden 4480, 128 Mamba heads, 40 query / 8 KV heads, MLP 15680, vocabulary 131072). "
                "Block size 256, prefill chunks of 256 tokens. *recompute*: time to first token of the N tokens "
                "from an empty cache (compile time taken out); `measured` is one end-to-end request, `composed` is "
                "the sum, over the 256-token chunks covering N, of the measured step time at each chunk's table "
                "width (the 32K recompute takes far longer than this benchmark's budget on 2 cores; the composed "
                "column is also given for the measured lengths, to check it). *disk hit*: time to first token of "
                "the same N tokens plus 16 new ones after the N-token state was evicted from the device, so it is "
                "read back from the disk tier (cold: its pages dropped from the page cache first). *device hit*: "
                "the same request with the state still on the device (the floor: computing the 16 tokens). "
                "*read + install*: the disk tier's part of a disk hit (read, checks, copy into the cache). States "
                "longer than the recompute limit are planted with random contents (a restore's cost does not "
                "depend on the values).", "",
                "| committed tokens | recompute s | disk hit s (cold) | disk hit s (warm) | device hit s "
                "| read + install s (cold) | read + install s (warm) | recompute / disk hit (cold) "
                "| recompute / disk hit (warm) | recompute / read + install (warm) | file MiB "
                "| composed recompute s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["engine"]:
            out.append(f"| {r['tokens']} | {r['recompute_s']} ({r['recompute']}) | {r['hit_cold_s']} | "
                       f"{r['hit_warm_s']} | {r['hit_device_s']} | {r['read_install_cold_s']} | "
                       f"{r['read_install_warm_s']} | {r['ratio_cold']} | {r['ratio_warm']} | "
                       f"{r['ratio_read_install_warm']} | {r['file_mib']} | {r['composed_s']} |")
        steps = result.get("prefill_step_s", {})
        out += ["", "Prefill step seconds (median, after warm-up) by tokens bucket and table width (blocks of 256 "
                "tokens): " + "; ".join(f"{k}: {t}" for k, t in steps.items()), ""]
    if result.get("state"):
        out += ["## The whole 56-layer Nano-9B-v2 state (no recompute measured)", "",
                "The state of the full model (4 attention layers of KV, the Mamba2 layers' conv and SSM state; "
                "random contents) written by the disk tier's format, read and checked (cold: pages dropped "
                "first; warm: in the page cache), and installed into a cache of the full model's shapes sized "
                "for 32K tokens with the host tier's compiled copy (on the CPU, XLA converts a bfloat16 pool to "
                "float32 and back around the copy, so install time follows the pool's size, not the state's).", "",
                "| committed tokens | file MiB | write s (fsynced) | read + check s (cold) | read + check s (warm) "
                "| install s |", "|---|---|---|---|---|---|"]
        for r in result["state"]:
            out.append(f"| {r['tokens']} | {r['file_mib']} | {r['write_s']} | {r['read_check_cold_s']} | "
                       f"{r['read_check_warm_s']} | {r['install_s']} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="disk_tier_cpu")
    p.add_argument("--lengths", default="1024,8192,32768")
    p.add_argument("--parts", default="engine,state")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--max-recompute", type=int, default=8192,
                   help="longest history recomputed end to end; longer ones sum measured step times")
    args = p.parse_args(argv)
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    lengths = [int(x) for x in args.lengths.split(",")]
    parts = args.parts.split(",")
    result = {"command": "python -m bench.bench_disk_tier " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, jax {jax.__version__}",
              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    if "state" in parts:
        result["state"] = bench_state(args, lengths)
    if "engine" in parts:
        result["engine"], result["prefill_step_s"] = bench_engine(args, lengths)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, args.name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(OUT_DIR, args.name + ".md"), "w") as f:
        f.write(_markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
