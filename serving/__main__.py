"""`python -m serving`: the OpenAI-compatible server (see serving/app.py and docs/engine_api.md).

    python -m serving                                  # the embedded default model on 127.0.0.1:8000
    python -m serving --model PATH --port 8001 --cache-mode exact --cache-dir /var/cache/hybrid

With --cache-dir the committed conversations and the stored responses (`/v1/responses`) survive restarts and
crashes: each settled turn and stored response is written to its state database (DIR/state.db, or --state-db)
before it is answered; a graceful shutdown (SIGTERM or SIGINT) also saves the device states there after the
in-flight requests finish (or are aborted after --graceful-timeout seconds), and the next start restores them.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import time

from serving.openai.chat_output import add_output_flags


def _memory(v: str) -> str | int:
    v = v.strip()
    return int(v) if v.isdigit() else v


def _fraction(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return x


def _non_negative(v: str) -> int:
    try:
        x = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {v!r}") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return x


def _positive(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return x


def _size(v: str) -> int:
    """A positive size in bytes: 262144, 256KiB, 512MiB, 1.5GB (K/M/G are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", v, re.I)
    size = int(float(m.group(1)) * 1024 ** "_KMG".index(m.group(2).upper() or "_")) if m else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"not a size such as 256KiB, 512MiB or bytes: {v!r}")
    return size


def add_grammar_flags(p) -> None:
    """The limits on output constraints (structured outputs, forced tool calls): serving.grammar.GrammarLimits."""
    p.add_argument("--max-grammar-bytes", type=_size, default=256 * 1024, metavar="SIZE",
                   help="largest output constraint (the JSON schema, regex, grammar or tool list a request's "
                        "structured outputs or tool_choice ask for), e.g. 256KiB: a larger one is refused with 400 "
                        "(default: 256KiB)")
    p.add_argument("--grammar-compile-timeout", type=_positive, default=1.0, metavar="SECONDS",
                   help="seconds a request waits for its output constraint to compile: a slower one is refused with "
                        "400, its compilation finishing in the background and cached for a retry if within the "
                        "limits (default: 1)")
    p.add_argument("--grammar-cache-memory", type=_size, default=256 * 1024 * 1024, metavar="SIZE",
                   help="estimated memory of the compiled output constraints kept for reuse, least recently used "
                        "dropped first; one that needs more than a quarter of it is refused with 400 (default: "
                        "256MiB)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="OpenAI-compatible server for hybrid Transformer+Mamba2 models with an exact "
                    "per-conversation cache.")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint directory (config.json, safetensors, tokenizer); default: the embedded "
                        "tiny default model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--cache-mode", choices=("exact", "align", "none"), default="exact",
                   help="exact: reuse the exact committed state of each conversation; align: reuse only up to "
                        "the last full block (what block-aligned engines do); none: recompute every turn "
                        "(default: exact)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block (engine default: 16)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="maximum tokens per sequence, prompt plus generation (engine default: 2048)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="maximum requests running at once (engine default: 8)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="number of KV blocks (default: derived from --kv-memory or from the lengths)")
    p.add_argument("--num-slots", type=int, default=None,
                   help="number of Mamba state slots, i.e. of running plus cached conversations (default: derived "
                        "from the memory budget, or from --max-num-seqs without one)")
    p.add_argument("--kv-memory", type=_memory, default=None,
                   help="one memory budget for the whole cache, KV blocks and Mamba state slots together, e.g. "
                        "512MiB, 40GiB or bytes; the cache never allocates past it (default: sized from the "
                        "lengths, or from --gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=None,
                   help="fraction in (0, 1] of the accelerator's memory this server may use, weights included "
                        "(as in vLLM): the cache gets that share minus the weights. The memory is what JAX may "
                        "allocate on the device (its allocator limit; XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by "
                        "default). Ignored with a warning on CPU; --kv-memory takes precedence (default: not used)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="chunked-prefill tokens per step (engine default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens of one step while streams are decoding: a prompt's prefill chunk shares them with "
                        "the decode rows, which bounds inter-token gaps (default: 64 on CPU, 2048 on GPU)")
    p.add_argument("--host-cache-memory", type=_memory, default=None,
                   help="host memory for evicted conversations, e.g. 1GiB (0: off; engine default: 1GiB)")
    p.add_argument("--disk-cache-memory", type=_memory, default="8GiB", metavar="SIZE",
                   help="with --cache-dir: disk space for conversation states in DIR/states, where checkpoints "
                        "evicted from host memory spill and committed states are written behind, so a restart "
                        "(even after a crash) resumes them without recompute (0: off; default: 8GiB)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="parameter and cache dtype. auto: the checkpoint's torch_dtype from its config.json "
                        "(bfloat16 for the released models; float32 if it names none), except on a CPU, where a "
                        "bfloat16 or float16 checkpoint computes in float32 when it fits in memory (several times "
                        "faster there). The Mamba SSM state and A_log, D, dt_bias stay float32 (default: auto)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="shard the parameters and the cache over N local devices (attention and Mamba by heads, "
                        "MLPs and experts by their inner dimension; docs/tensor_parallel.md). On CPU, N host "
                        "devices need XLA_FLAGS=--xla_force_host_platform_device_count=N (default: 1)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory (tokenizer.json and tokenizer_config.json, or a byte_tokenizer.json "
                        "marker) replacing the model's (default: the --model directory)")
    p.add_argument("--chat-template", default=None, metavar="PATH_OR_TEMPLATE",
                   help="chat template replacing the model's: a jinja file or the template itself (default: the "
                        "checkpoint's own)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="sampling defaults for fields a request leaves out: 'auto' reads the checkpoint's "
                        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, "
                        "max_new_tokens), 'vllm' uses the server's own, DIR reads DIR/generation_config.json "
                        "(default: auto)")
    add_output_flags(p)
    add_grammar_flags(p)
    p.add_argument("--served-model-name", default=None,
                   help="model name reported by /v1/models and in responses (default: the model's name)")
    p.add_argument("--api-key", default=os.environ.get("HYBRID_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: "
                        "$HYBRID_SERVE_API_KEY; none if unset)")
    p.add_argument("--cache-dir", default=None,
                   help="durable conversations and stored responses (DIR/state.db, mode 0600, written as each turn "
                        "settles) and device states (saved on graceful shutdown, restored on start)")
    p.add_argument("--state-db", default=None, metavar="URL",
                   help="the database that journals every settled turn (each written before it counts as settled, "
                        "so a crash loses none): postgresql://... to share conversations between replicas, or an "
                        "SQLite file (default: DIR/state.db with --cache-dir; none without)")
    p.add_argument("--max-stored-responses", type=_non_negative, default=10000,
                   help="most responses of the Responses API kept for GET and previous_response_id, least recently "
                        "used evicted first; 0 stores none (default: 10000)")
    p.add_argument("--conversation-ttl", type=float, default=None, metavar="SECONDS",
                   help="forget a conversation (and every checkpoint it committed) after this long without a turn; "
                        "anonymous checkpoints unused for as long go too; 0: never (engine default: 86400, a day)")
    p.add_argument("--max-conversations", type=int, default=None,
                   help="bound on the conversation table: beyond it the least recently used idle conversations are "
                        "forgotten (engine default: 100000)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest accepted request body in bytes (413 above; default 4 MiB)")
    p.add_argument("--request-body-timeout", type=_positive, default=30.0, metavar="SECONDS",
                   help="seconds to receive a request's whole body after its headers: a slower client (a body "
                        "shorter than its Content-Length, a stalled chunked body) gets 408 and its connection is "
                        "closed (default: 30)")
    p.add_argument("--request-header-timeout", type=_positive, default=60.0, metavar="SECONDS",
                   help="seconds to receive a request's head (request line and headers), from its first byte, or "
                        "from the connection's opening for its first request: a connection that sent part of a "
                        "head gets 408 and is closed, one that sent nothing is closed (default: 60, as nginx's "
                        "client_header_timeout)")
    p.add_argument("--timeout-keep-alive", type=_positive, default=60.0, metavar="SECONDS",
                   help="close an idle keep-alive connection after this many seconds without a new request after "
                        "its last response, as uvicorn's --timeout-keep-alive (default: 60; uvicorn's is 5)")
    p.add_argument("--max-connections", type=_non_negative, default=1000, metavar="N",
                   help="most open connections served at once: a connection opened beyond them has its request "
                        "answered 503 (too_many_connections, Retry-After: 1) and is closed; the open-file limit is "
                        "raised to fit when allowed; 0: no cap (default: 1000)")
    p.add_argument("--require-cache-salt", action="store_true",
                   help="refuse (400) requests that carry a conversation_id or previous_response_id, and "
                        "conversation reads and deletes, without a cache_salt (X-Cache-Salt header or body field), "
                        "so client-chosen ids never share the unsalted namespace (default: a salt is optional)")
    p.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="seconds to let in-flight requests finish on shutdown before aborting them (default: 10)")
    p.add_argument("--compilation-cache-dir", default=os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
                       os.path.expanduser("~"), ".cache", "hybrid-serve", "jax"),
                   help="JAX's persistent compilation cache: compiled step programs are kept here, so a restart "
                        "warms up in seconds; 'none' turns it off (default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/hybrid-serve/jax)")
    p.add_argument("--warmup", default="first", choices=("first", "all", "none"),
                   help="step programs compiled before the server reports healthy: 'first' those a first short "
                        "request needs, the rest in the background while serving (a request whose program is not "
                        "ready waits for that one compile); 'all' every one; 'none' none, each compiles when "
                        "first used (default: first)")
    p.add_argument("--no-warmup", dest="warmup", action="store_const", const="none",
                   help="the same as --warmup none")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="log level of the server and the engine (default: info)")
    return p


def _compilation_cache(directory: str) -> None:
    """Turn on JAX's persistent compilation cache (every program, however quick to compile) unless 'none'."""
    if directory.lower() == "none":
        return
    import jax
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening: connections are refused until the engine is ready), so a
    port in use is said before anything is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("serving")
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        log.error("cannot start: cannot listen on %s:%d: %s", args.host, args.port, e.strerror or e)
        return 2

    _compilation_cache(args.compilation_cache_dir)
    import uvicorn

    from serving import Engine
    from serving.openai.api.http_limits import fit_fd_limit, limited_protocol
    from serving.app import DEFAULT_MAX_REQUEST_BYTES, create_app
    from serving.metrics import Metrics
    from serving.responses_store import ResponsesStore

    engine_kw = {k: v for k, v in dict(
        cache_mode=args.cache_mode, block_size=args.block_size, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks, num_slots=args.num_slots,
        kv_memory=args.kv_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        max_prefill_tokens=args.max_prefill_tokens, max_num_batched_tokens=args.max_num_batched_tokens,
        host_cache_memory=args.host_cache_memory, tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype, served_model_name=args.served_model_name,
        chat_template=args.chat_template, generation_config=args.generation_config, tokenizer=args.tokenizer,
        conversation_ttl=args.conversation_ttl,
        max_conversations=args.max_conversations).items() if v is not None}
    if args.cache_dir:
        from serving.persist import claim
        try:
            claim(args.cache_dir)  # before the minutes of loading: a wrong directory is said at once
        except (ValueError, OSError) as e:
            log.error("cannot start: %s", e)
            return 2
    metrics = Metrics()
    t0 = time.perf_counter()
    log.info("loading %s (%s)", args.model or "the embedded default model",
             ", ".join(f"{k}={v}" for k, v in engine_kw.items()))
    try:
        engine = Engine.from_pretrained(args.model, metrics=metrics, **engine_kw)
    except (ValueError, FileNotFoundError) as e:  # a bad checkpoint, config or memory plan: say which flag
        log.error("cannot start: %s", e)
        return 2
    metrics.bind_engine(engine)
    state_db = args.state_db or args.cache_dir
    if state_db:
        try:
            log.info("conversations journaled in %s", engine.use_state_db(state_db))
        except Exception as e:  # noqa: BLE001 (an unusable database: say so and stop)
            log.error("cannot start: the state database %s cannot be used: %s", state_db, e)
            engine.shutdown()
            return 2
    from serving.grammar import GrammarLimits
    engine.grammar_limits = GrammarLimits(max_bytes=args.max_grammar_bytes, cache_memory=args.grammar_cache_memory,
                                          compile_timeout=args.grammar_compile_timeout)
    if args.warmup != "none":
        info = engine.warmup(progress=sys.stderr.isatty(), first_only=args.warmup == "first")
        log.info("compiled %d step programs and %d cache programs%s", info["programs"], info["cache_programs"],
                 f"; {info['background']} more compile in the background" if info["background"] else "")
    log.info("engine ready in %.1fs", time.perf_counter() - t0)

    if args.cache_dir:
        try:
            restored = engine.load_state(args.cache_dir)
            log.info("cache state %s from %s", "restored" if restored else "not restored (none usable)",
                     args.cache_dir)
        except Exception:
            log.exception("could not restore the cache state from %s; starting empty", args.cache_dir)
    if args.cache_dir:  # the disk tier, after the saved state (states in both are indexed once)
        from hybrid_jax.memory import parse_bytes
        from serving.disk_tier import enable as enable_disk_tier
        try:
            disk_bytes = parse_bytes(args.disk_cache_memory)
        except ValueError as e:
            log.error("cannot start: --disk-cache-memory: %s", e)
            engine.shutdown()
            return 2
        try:
            if disk_bytes:
                enable_disk_tier(engine, args.cache_dir, disk_bytes)
        except Exception:
            log.exception("could not open the disk tier in %s; going on without it", args.cache_dir)
    from serving.responses_db import open_responses
    responses = open_responses(engine, args.max_stored_responses, args.cache_dir)

    app = create_app(engine, api_key=args.api_key, served_model_name=args.served_model_name,
                     max_request_bytes=args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES, metrics=metrics,
                     responses_store=responses, request_body_timeout=args.request_body_timeout,
                     require_cache_salt=args.require_cache_salt, tool_call_parser=args.tool_call_parser,
                     reasoning_parser=args.reasoning_parser)
    name = args.served_model_name or engine.model_name

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.should_exit:
                return
            port = args.port
            for srv in getattr(self, "servers", []):
                for sock in getattr(srv, "sockets", None) or []:
                    port = sock.getsockname()[1]
                    break
            print(f"Serving {name} on http://{args.host}:{port}", flush=True)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                log.info("received %s: shutting down%s", signal.Signals(sig).name,
                         " (the cache state will be saved)" if args.cache_dir else "")
            super().handle_exit(sig, frame)

    # uvicorn's h11 protocol with a head timeout and the connection cap, forced even where httptools is installed
    # (serving/openai/api/http_limits.py); the cap replaces uvicorn's limit_concurrency, which also counts requests.
    fit_fd_limit(args.max_connections)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout, access_log=level <= logging.DEBUG,
                            lifespan="off", limit_concurrency=None, timeout_keep_alive=args.timeout_keep_alive,
                            http=limited_protocol(header_timeout=args.request_header_timeout,
                                                  max_connections=args.max_connections))
    server = Server(config)

    # uvicorn captures SIGTERM/SIGINT while serving and re-raises them, with the handlers it found, once it
    # has shut down; these handlers make that re-raise just a note, so the state is saved below before exit.
    received: list[int] = []

    def _note(sig, frame):
        received.append(sig)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _note)

    rc = 0
    try:
        server.run(sockets=[sock])
        if not server.started:
            rc = 1
    finally:
        # Late signals during the save are noted, not fatal: a half-written state is never published anyway.
        if args.cache_dir and server.started:
            t = time.perf_counter()
            try:
                engine.save_state(args.cache_dir)
                log.info("cache state saved to %s in %.2fs", args.cache_dir, time.perf_counter() - t)
            except Exception:
                log.exception("could not save the cache state to %s", args.cache_dir)
                rc = 1
            try:
                if isinstance(responses, ResponsesStore):  # else: in the state database already
                    path = responses.save(args.cache_dir)
                    log.info("%d stored responses saved to %s", len(responses), path)
            except Exception:
                log.exception("could not save the stored responses to %s", args.cache_dir)
                rc = 1
        engine.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
