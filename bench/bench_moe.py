"""Mixture-of-experts cost on CPU: step time as the number of experts grows at fixed top-k (batch 1), and the
memory each device holds at tensor parallel sizes 1, 2 and 4. Results: docs/benchmarks/<name>.json and .md.

    python -m bench.bench_moe --name moe_cpu

experts  E = 8, 16, 32, 64, 128 routed experts, top-6, relu2 experts of 512 inside a 1024-wide model (float32):
         - the expert compute of one token (6 routed rows, up + down) through pallas_kernels.grouped_matmul,
           "tiled" (the CPU default) and "ragged_dot" (jax.lax.ragged_dot, which XLA:CPU lowers as a dense
           product over every expert);
         - the whole MoE sublayer (router, grouped top-k, experts, shared expert) for one token;
         - a full one-token decode step of a 4-layer model "MEME" (2 Mamba + 2 MoE layers) through the cached
           step the engine runs.
memory   per-device bytes of the parameters (bfloat16) and of one cache slot + one 16-token KV block, at TP 1,
         2, 4: computed from the sharding rules (hybrid_jax/mesh.py) for the real NVIDIA-Nemotron-3-Nano-30B-A3B,
         Granite-4.0-H-Tiny and -Small configs, and measured (the bytes of the arrays actually placed on device 0)
         on a real-width 3-layer Granite-4.0-H-Tiny ("mamba, attention, mamba", all 64 experts) on 4 host devices.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import median_seconds  # noqa: E402
from hybrid_jax import from_hf  # noqa: E402
from hybrid_jax import sharding as S  # noqa: E402
from hybrid_jax.mesh import param_specs  # noqa: E402
from hybrid_jax.generate import SingleSequence  # noqa: E402
from hybrid_jax.loader import expected_shapes  # noqa: E402
from hybrid_jax.memory import block_bytes, slot_bytes  # noqa: E402
from hybrid_jax.moe import moe_block  # noqa: E402
from hybrid_jax.stack import stack_layers  # noqa: E402
from pallas_kernels.grouped_matmul import grouped_matmul  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT_DIR = os.path.join(ROOT, "docs", "benchmarks")
REAL = ["nvidia-nemotron-3-nano-30b-a3b", "granite-4.0-h-tiny", "granite-4.0-h-small"]
TOP_K, HIDDEN, INTER = 6, 1024, 512


def _time(fn, reps: int) -> float:
    """Median milliseconds of fn() (which must block) over reps runs, after two warm runs."""
    return 1e3 * median_seconds(fn, reps, warm=2)


def _moe_config(experts: int) -> dict:
    """A 1024-wide NemotronH MoE model, "MEME": Nemotron 3's router and expert kinds at small widths."""
    return {"model_type": "nemotron_h", "vocab_size": 1024, "hidden_size": HIDDEN, "hybrid_override_pattern": "MEME",
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": INTER,
            "mamba_num_heads": 16, "mamba_head_dim": 64, "n_groups": 2, "ssm_state_size": 64, "conv_kernel": 4,
            "chunk_size": 64, "n_routed_experts": experts, "num_experts_per_tok": TOP_K,
            "moe_intermediate_size": INTER, "moe_shared_expert_intermediate_size": 2 * INTER,
            "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1, "norm_topk_prob": True}


def _random_params(cfg, seed: int = 0) -> dict:
    """Random params of every sublayer (std 0.02 matrices, unit norms; Mamba A_log / dt_bias in range)."""
    rng = np.random.default_rng(seed)
    layers = []
    for kind in cfg.sublayers:
        p = {}
        for name, shape in expected_shapes(cfg, kind).items():
            if name.endswith("_b") or name == "experts_gate" or (kind == "moe" and name.startswith(("shared_gate",
                                                                                                     "latent"))):
                continue
            if kind == "mlp" and name == "gate":
                continue
            if name in ("norm", "norm_w", "D"):
                a = np.ones(shape)
            elif name == "A_log":
                a = np.log(np.arange(1, shape[0] + 1))
            elif name == "dt_bias":
                a = np.full(shape, -3.0)
            elif name == "router_bias":
                a = np.zeros(shape)
            else:
                a = 0.02 * rng.standard_normal(shape)
            p[name] = a.astype(np.float32)
        layers.append(p)
    V, D = cfg.vocab_size, cfg.hidden_size
    params = {"embed": (0.02 * rng.standard_normal((V, D))).astype(np.float32),
              "final_norm": np.ones(D, np.float32), "lm_head": (0.02 * rng.standard_normal((V, D))).astype(np.float32),
              "layers": layers}
    return jax.tree.map(jnp.asarray, stack_layers(params, cfg, xp=np))


def bench_experts(reps: int, experts=(8, 16, 32, 64, 128)) -> list[dict]:
    rows = []
    for E in experts:
        cfg = from_hf(_moe_config(E))
        params = _random_params(cfg)
        moe_p = jax.tree.map(lambda a: a[0], params["stack"]["moe"])
        rng = np.random.default_rng(E)
        x = jnp.asarray(rng.standard_normal((TOP_K, HIDDEN)), jnp.float32)  # one token's 6 routed rows
        sizes = np.zeros(E, np.int32)
        sizes[rng.choice(E, TOP_K, replace=False)] = 1  # 6 distinct experts, one row each
        sizes = jnp.asarray(sizes)
        row = {"experts": E, "top_k": TOP_K, "expert_params_per_layer": 2 * E * HIDDEN * INTER}
        for impl in ("tiled", "ragged_dot"):
            f = jax.jit(lambda x, up, down, s, impl=impl: grouped_matmul(
                jnp.square(jax.nn.relu(grouped_matmul(x, up, s, impl=impl))), down, s, impl=impl))
            row[f"experts_{impl}_ms"] = _time(
                lambda: f(x, moe_p["experts_up"], moe_p["experts_down"], sizes).block_until_ready(), reps)
        layer = jax.jit(lambda p, h: moe_block(p, h, cfg))
        h = jnp.asarray(rng.standard_normal((1, 1, HIDDEN)), jnp.float32)
        row["moe_layer_ms"] = _time(lambda: layer(moe_p, h).block_until_ready(), reps)
        seq = SingleSequence(params, cfg, 64)
        seq.extend(list(range(1, 17)))
        row["decode_step_ms"] = _time(lambda: seq.step(7).block_until_ready(), reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _tp_shapes(cfg, tp: int) -> dict:
    """Shape structs of the stacked params of cfg in the tp layout (nothing allocated)."""
    L = {k: cfg.sublayers.count(k) for k in set(cfg.sublayers)}
    tcfg = S.tp_config(cfg, tp)
    stack = {}
    for kind, n in L.items():
        shapes = dict(expected_shapes(tcfg if kind in ("mamba", "attention") else cfg, kind))
        keep = _present(cfg, kind)
        stack[kind] = {k: jax.ShapeDtypeStruct((n,) + s, jnp.float32 if k in ("A_log", "D", "dt_bias", "router_bias")
                                               else jnp.bfloat16) for k, s in shapes.items() if k in keep}
    V, D = cfg.vocab_size, cfg.hidden_size
    out = {"embed": jax.ShapeDtypeStruct((V, D), jnp.bfloat16), "final_norm": jax.ShapeDtypeStruct((D,), jnp.bfloat16),
           "stack": stack}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = jax.ShapeDtypeStruct((V, D), jnp.bfloat16)
    return out, tcfg


def _present(cfg, kind: str) -> set:
    """The params a released checkpoint of cfg has for a sublayer kind (no biases in these models)."""
    if kind == "mamba":
        return {"norm", "in_proj", "conv_w", "conv_b", "dt_bias", "A_log", "D", "norm_w", "out_proj"}
    if kind == "attention":
        return {"norm", "q", "k", "v", "o"}
    if kind == "mlp":
        return {"norm", "up", "down"} | ({"gate"} if cfg.mlp_kind == "swiglu" else set())
    names = {"norm", "router", "experts_up", "experts_down", "shared_up", "shared_down"}
    if cfg.moe.router == "sigmoid":
        names.add("router_bias")
    if cfg.moe.expert_kind == "swiglu":
        names |= {"experts_gate", "shared_gate"}
    return names


def _per_device(shapes: dict, tcfg) -> tuple[int, int]:
    """(total bytes, bytes on one device) of shape structs sharded by mesh.param_specs."""
    specs = param_specs(shapes, tcfg)
    total = dev = 0
    for s, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        n = math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
        total += n
        dev += n // tcfg.tp if "tp" in tuple(spec) else n
    return total, dev


def bench_memory_rules() -> list[dict]:
    rows = []
    for name in REAL:
        with open(os.path.join(ROOT, "configs", "models", name + ".json")) as f:
            cfg = from_hf(json.load(f))
        for tp in (1, 2, 4):
            shapes, tcfg = _tp_shapes(cfg, tp)
            total, dev = _per_device(shapes, tcfg)
            rows.append({"model": name, "tp": tp, "param_bytes_total": total, "param_bytes_per_device": dev,
                         "slot_bytes_per_device": slot_bytes(tcfg, jnp.bfloat16),
                         "block16_bytes_per_device": block_bytes(tcfg, 16, jnp.bfloat16)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_memory_measured() -> list[dict]:
    """Real-width 3-layer Granite-4.0-H-Tiny (bf16) placed at TP 1, 2, 4: bytes of the arrays on device 0."""
    from hybrid_jax.cache import init_cache

    with open(os.path.join(ROOT, "configs", "models", "granite-4.0-h-tiny.json")) as f:
        hf = json.load(f)
    hf.update(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"])
    cfg = from_hf(hf)
    host = _random_host(cfg)
    rows = []
    dev0 = jax.devices()[0]
    for tp in (1, 2, 4):
        tcfg, params = S.shard_model(cfg, host, tp) if tp > 1 else (cfg, jax.device_put(host, dev0))
        cache = init_cache(tcfg, num_blocks=17, block_size=16, num_slots=9, dtype=jnp.bfloat16)

        def on_dev0(tree):
            return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards if s.device == dev0)

        rows.append({"model": "granite-4.0-h-tiny, 3 layers (M * M), real widths", "tp": tp,
                     "param_bytes_device0": on_dev0(params), "cache_bytes_device0": on_dev0(cache),
                     "cache_bytes_planned_per_device": 17 * block_bytes(tcfg, 16, jnp.bfloat16)
                     + 9 * slot_bytes(tcfg, jnp.bfloat16)})
        print(json.dumps(rows[-1]), flush=True)
        del params, cache
    return rows


def _random_host(cfg) -> dict:
    """Stacked numpy params of cfg as a released bf16 checkpoint holds them (A_log / D / dt_bias float32)."""
    rng = np.random.default_rng(0)

    def value(name, shape):
        a = 0.02 * rng.standard_normal(shape, np.float32)
        return a if name in ("A_log", "D", "dt_bias", "router_bias") else a.astype(jnp.bfloat16)

    layers = [{k: value(k, s) for k, s in expected_shapes(cfg, kind).items() if k in _present(cfg, kind)}
              for kind in cfg.sublayers]
    V, D = cfg.vocab_size, cfg.hidden_size
    return stack_layers({"embed": value("embed", (V, D)), "final_norm": value("final_norm", (D,)), "layers": layers},
                        cfg, xp=np)


def _markdown(res: dict, cmd: str) -> str:
    gib = lambda n: f"{n / 2 ** 30:.2f}"
    mib = lambda n: f"{n / 2 ** 20:.2f}"
    load = res.get("load_average_before_after", ["?", "?"])
    out = [f"# Mixture of experts on CPU ({res['device']})", "", f"Command: `{cmd}`", "",
           f"A shared machine: 1-minute load average {load[0]} before the run, {load[1]} after (2 cores), so "
           "single timings move by tens of percent; read the trend along a column, not the digits.", "",
           "## Step time against the number of experts (top-6, batch 1, float32, ms, median)", "",
           "Expert compute of one token = the 6 routed rows through up and down projections (relu2) of 512 in a "
           "1024-wide model; MoE layer = router + grouped top-k + experts + shared expert; decode step = one token "
           "through a 4-layer model (2 Mamba2 + 2 MoE layers) with its cache.", "",
           "| experts | expert params per layer | experts, tiled (default) | experts, ragged_dot | MoE layer | "
           "decode step |", "|---|---|---|---|---|---|"]
    for r in res["experts"]:
        out.append(f"| {r['experts']} | {r['expert_params_per_layer'] / 1e6:.0f}M | {r['experts_tiled_ms']:.3f} | "
                   f"{r['experts_ragged_dot_ms']:.3f} | {r['moe_layer_ms']:.3f} | {r['decode_step_ms']:.3f} |")
    col = lambda k: [r[k] for r in res["experts"]]
    e0, e1 = res["experts"][0]["experts"], res["experts"][-1]["experts"]
    out += ["", f"From {e0} to {e1} experts ({e1 // e0}x the expert weights): the tiled expert compute stays between "
            f"{min(col('experts_tiled_ms')):.1f} and {max(col('experts_tiled_ms')):.1f} ms (it reads the 6 chosen "
            f"experts' weights, whatever their number), the MoE layer between {min(col('moe_layer_ms')):.1f} and "
            f"{max(col('moe_layer_ms')):.1f} ms and the decode step between {min(col('decode_step_ms')):.1f} and "
            f"{max(col('decode_step_ms')):.1f} ms, with no trend; jax.lax.ragged_dot on XLA:CPU grows "
            f"{col('experts_ragged_dot_ms')[-1] / col('experts_ragged_dot_ms')[0]:.0f}x (a dense product over "
            "every expert), which is why the CPU default is the tiled loop (on GPU/TPU ragged_dot is XLA's grouped "
            "GEMM; not measured here)."]
    out += ["", "## Memory per device against the tensor parallel size (bfloat16 parameters)", "",
            "From the sharding rules (`hybrid_jax/mesh.py`), real configs, nothing allocated:", "",
            "| model | TP | params total (GiB) | params per device (GiB) | Mamba slot per device (MiB) | "
            "16-token KV block per device (MiB) |", "|---|---|---|---|---|---|"]
    for r in res["memory_rules"]:
        out.append(f"| {r['model']} | {r['tp']} | {gib(r['param_bytes_total'])} | {gib(r['param_bytes_per_device'])} "
                   f"| {mib(r['slot_bytes_per_device'])} | {mib(r['block16_bytes_per_device'])} |")
    out += ["", "Parameters per device halve with each doubling of TP, plus what is duplicated: KV heads below TP "
            "(Nemotron 3 Nano has 2, so at TP 4 each device holds one of 4 duplicated heads and its KV block does "
            "not shrink from TP 2 to 4) and B/C groups below TP (Granite has 1 group: each device keeps a copy), "
            "the replicated norms, routers and router bias.", "",
            "Measured: the bytes of the arrays placed on device 0 (4 host devices), real-width 3-layer "
            "Granite-4.0-H-Tiny, cache of 17 blocks x 16 tokens + 9 slots:", "",
            "| model | TP | params on device 0 (MiB) | cache on device 0 (MiB) | cache planned per device (MiB) |",
            "|---|---|---|---|---|"]
    for r in res["memory_measured"]:
        out.append(f"| {r['model']} | {r['tp']} | {mib(r['param_bytes_device0'])} | {mib(r['cache_bytes_device0'])} "
                   f"| {mib(r['cache_bytes_planned_per_device'])} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="moe_cpu")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json")
    a = p.parse_args(argv)
    if a.render:
        with open(os.path.join(OUT_DIR, a.name + ".json")) as f:
            res = json.load(f)
        with open(os.path.join(OUT_DIR, a.name + ".md"), "w") as f:
            f.write(_markdown(res, res["command"]))
        return 0
    dev = jax.devices()[0]
    load_before = os.getloadavg()
    res = {"device": f"{dev.platform} ({os.cpu_count()} cores, {jax.device_count()} host devices)",
           "experts": bench_experts(a.reps), "memory_rules": bench_memory_rules(),
           "memory_measured": bench_memory_measured()}
    res["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    cmd = "python -m bench.bench_moe --name " + a.name + ("" if a.reps == 30 else f" --reps {a.reps}")
    res["command"] = cmd
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, a.name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(OUT_DIR, a.name + ".md"), "w") as f:
        f.write(_markdown(res, cmd))
    print(_markdown(res, cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
