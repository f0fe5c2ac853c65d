"""The command line of `python -m serving.batch` (README.md, "`python -m serving.batch` flags"): `build_parser`,
and `main`, which loads the engine and runs the batch."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from serving.batch.progress import format_summary
from serving.batch.runner import run_batch
from serving.openai.chat_output import OutputConfig, add_output_flags


def _memory(v: str) -> str | int:
    v = v.strip()
    return int(v) if v.isdigit() else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.batch",
                                description="Offline chat completions over a JSONL file (OpenAI batch format) with "
                                            "the exact per-conversation cache.")
    p.add_argument("-i", "--input", required=True, metavar="FILE",
                   help="input JSONL, one request per line (format: README.md, 'Offline batches')")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="output JSONL; appended to, and custom_ids already in it are skipped (a re-run resumes)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint directory (default: the embedded tiny default model)")
    p.add_argument("--cache-mode", choices=("exact", "align", "none"), default="exact",
                   help="exact: each turn reuses the exact committed state of its conversation; align: only up to "
                        "the last full block; none: recompute every turn (default: exact)")
    p.add_argument("--block-size", type=int, default=None, metavar="N", help="tokens per KV block (default: 16)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="maximum tokens per sequence, prompt plus generation (default: 2048)")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help="requests running at once (default: 8)")
    p.add_argument("--num-blocks", type=int, default=None, metavar="N",
                   help="number of KV blocks (default: derived from --kv-memory or from the lengths)")
    p.add_argument("--kv-memory", type=_memory, default=None, metavar="SIZE",
                   help="memory for KV blocks plus Mamba state slots, e.g. 512MiB, 2GiB or bytes")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="parameter and cache dtype; auto takes the checkpoint's torch_dtype (on a CPU, float32 for "
                        "a half-precision checkpoint that fits in memory). The Mamba SSM state stays float32 "
                        "(default: auto)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="model name in the responses, and the one request bodies may name (default: the "
                        "checkpoint directory's name; hybrid-tiny-default for the embedded model)")
    add_output_flags(p)
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="conversations run at once (default: --max-num-seqs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="log level (default: warning)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not os.path.isfile(args.input):
        print(f"error: input file {args.input!r} not found", file=sys.stderr)
        return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("error: --concurrency must be >= 1", file=sys.stderr)
        return 2
    from serving import Engine

    engine_kw = {k: v for k, v in dict(cache_mode=args.cache_mode, block_size=args.block_size,
                                       max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                       num_blocks=args.num_blocks, kv_memory=args.kv_memory).items()
                 if v is not None}
    try:
        engine = Engine.from_pretrained(args.model, dtype=args.dtype, served_model_name=args.served_model_name,
                                        **engine_kw)
    except Exception as e:
        print(f"error: cannot load the model: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        output = OutputConfig.create(args.tool_call_parser, args.reasoning_parser, engine.tokenizer.chat_template)
        summary = run_batch(args.input, args.output, engine, concurrency=args.concurrency,
                            served_model_name=args.served_model_name, progress=not args.no_progress, output=output)
    finally:
        engine.shutdown()
    print(format_summary(summary), flush=True)
    return 1 if summary.get("interrupted") else 0
