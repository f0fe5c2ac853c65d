"""The reference a user would otherwise run: the same checkpoint and prompts through Hugging Face transformers
on the same device. It has no conversation cache, so each turn's TTFT is a prefill of history + suffix.

    python -m bench.bench_transformers --model DIR --histories 1024,4096 --suffix 16 --decode-steps 32
Writes docs/benchmarks/<name>_transformers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")


def main(argv=None):
    import torch
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--histories", default="256,512,1024,2048")
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="reference")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(dev).eval()
    V = model.config.vocab_size
    rng = np.random.RandomState(0)
    rows = []
    for H in [int(h) for h in args.histories.split(",")]:
        n = H + args.suffix
        ids = torch.tensor(rng.randint(0, V, (1, n)), device=dev)
        times = []
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                model(ids, position_ids=torch.arange(n, device=dev)[None], logits_to_keep=1)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append({"history": H, "suffix": args.suffix, "ttft_ms": 1e3 * statistics.median(times[1:])})
        print(f"transformers ttft history {H}: {rows[-1]['ttft_ms']:.1f} ms", flush=True)
    prompt = torch.tensor(rng.randint(0, V, (1, 128)), device=dev)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.decode_steps, min_new_tokens=args.decode_steps, do_sample=False)
        dt = time.perf_counter() - t0
    res = {"model": args.model, "device": dev, "dtype": args.dtype, "ttft": rows,
           "decode_batch1_tokens_per_s": args.decode_steps / dt,
           "command": "python -m bench.bench_transformers " + " ".join(argv or os.sys.argv[1:])}
    print(f"transformers decode batch 1: {res['decode_batch1_tokens_per_s']:.1f} tok/s (includes prefill of 128)")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, f"{args.name}_transformers.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
