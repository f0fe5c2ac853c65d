"""`python -m serving.batch`: offline chat completions over a JSONL file in the OpenAI batch format.

    python -m serving.batch -i requests.jsonl -o results.jsonl [--model PATH] [--cache-mode exact|align|none]
        [--block-size N] [--max-model-len N] [--max-num-seqs N] [--dtype float32] [--concurrency N]

Input, one request per line (blank lines are ignored)::

    {"custom_id": "c1-t1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [...], "max_tokens": 16, "temperature": 0, "conversation_id": "c1", "cache_salt": "s"}}

The body is validated exactly as `POST /v1/chat/completions` of the server validates it (the same request model
and limits, `serving.openai`) and answered with the same `chat.completion` object (`serving.openai.bodies`);
`stream` and `stream_options` are ignored (whole responses are written). A `model` in the body must name the
served model (`--served-model-name`, default the checkpoint directory's name), as for the server.

Conversations: the lines of one conversation (same `cache_salt` + `conversation_id`) run one after another in
file order, each turn reusing the exact committed cache of the previous one; different conversations (and lines
without a `conversation_id`) run concurrently, one thread per conversation, at most `--concurrency` at once, all
submitting to one `Engine` (which batches them).

Output, one line per input line, written as each finishes (so in file order within each conversation)::

    {"id": "batch_req_...", "custom_id": "c1-t1", "error": null,
     "response": {"status_code": 200, "request_id": "<engine request id>", "body": {<chat.completion>}}}

Errors (one scheme for every failure): `"response": null` and
`"error": {"code", "message", "line", "status_code", "type", "param"}`, where `line` is the 1-based input line,
`status_code`/`type`/`param` what the server would have answered, and `code` one of `invalid_json`,
`invalid_line`, `invalid_custom_id`, `duplicate_custom_id`, `invalid_method`, `invalid_url`, `invalid_body`, or
the server's error code for a request it would reject (`invalid_value` for validation, `context_length_exceeded`,
`model_not_found`, `generation_error`, ...; the error type when the server gives no code). A bad line never stops
the run.

Re-runs: the output is opened in append mode; custom_ids already present in it (successes and errors alike; lines
without a usable custom_id by their line number) are skipped, so an interrupted run is resumed by running the same
command again. A conversation resumed after some of its turns were done is recomputed once with the full history
(the done turns' messages plus their answers from the output), then continues from the cache. A truncated last
output line (a crash mid-write) is cut off first. A custom_id repeated in the input is an error line.

At the end a summary is printed (requests, errors, prompt / cached / generated tokens, wall time, tokens/s).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from serving.openai import bodies
from serving.openai.chat_output import ChoiceOutput, OutputConfig, add_output_flags, choice, plan_chat
from serving.openai.errors import APIError, as_api_error
from serving.openai.logprobs import LogprobFormatter
from serving.openai.parse import engine_vocab_size, parse_request
from serving.openai.requests import ChatCompletionRequest

log = logging.getLogger("serving.batch")

CHAT_URL = "/v1/chat/completions"
_OVERLOADED_RETRIES = 50


# --------------------------------------------------------------------------------------------------
# Input lines
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Line:
    lineno: int
    custom_id: Any = None
    body: dict | None = None
    key: tuple | None = None            # conversation group key
    error: dict | None = None           # a line-level error, written without running
    prev: dict | None = None            # the record of an earlier run: skipped, used to rebuild history


def _error_record(custom_id, lineno: int, code: str, message: str, *, status: int = 400,
                  type: str | None = None, param: str | None = None) -> dict:
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": lineno, "status_code": status,
                      "type": type or bodies.error_type(status), "param": param}}


def _group_key(body) -> tuple | None:
    if isinstance(body, dict):
        cid = body.get("conversation_id")
        if isinstance(cid, str) and cid:
            salt = body.get("cache_salt")
            return ("conversation", json.dumps(salt), cid)
    return None


def parse_lines(text_lines, done_ids: dict, done_lines: set) -> list[_Line]:
    """Parse input lines into _Line items (line-level errors attached, already done ones marked)."""
    out: list[_Line] = []
    seen: set = set()
    for lineno, text in enumerate(text_lines, 1):
        if not text.strip():
            continue
        item = _Line(lineno)
        out.append(item)
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, ValueError) as e:
            item.error = _error_record(None, lineno, "invalid_json", f"line {lineno} is not valid JSON: {e}")
        else:
            if not isinstance(obj, dict):
                item.error = _error_record(None, lineno, "invalid_line",
                                           f"line {lineno} must be a JSON object with custom_id, method, url, body")
            else:
                _check_line(item, obj, seen)
        if item.custom_id is not None and item.custom_id in done_ids:
            item.prev = done_ids[item.custom_id]
        elif item.custom_id is None and lineno in done_lines:
            item.prev = {}
    return out


def _check_line(item: _Line, obj: dict, seen: set) -> None:
    n = item.lineno
    cid = obj.get("custom_id")
    body = obj.get("body")
    item.key = _group_key(body)
    if isinstance(cid, str) and cid:
        item.custom_id = cid
    else:
        item.error = _error_record(None, n, "invalid_custom_id",
                                   f"line {n}: custom_id must be a non-empty string", param="custom_id")
        return
    if cid in seen:
        item.error = _error_record(cid, n, "duplicate_custom_id",
                                   f"line {n}: custom_id {cid!r} already appears on an earlier line",
                                   param="custom_id")
        return
    seen.add(cid)
    method = obj.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        item.error = _error_record(cid, n, "invalid_method", f"line {n}: method must be POST, got {method!r}",
                                   status=405, param="method")
    elif obj.get("url") != CHAT_URL:
        item.error = _error_record(cid, n, "invalid_url",
                                   f"line {n}: url must be {CHAT_URL!r}, got {obj.get('url')!r}", status=404,
                                   param="url")
    elif not isinstance(body, dict):
        item.error = _error_record(cid, n, "invalid_body", f"line {n}: body must be a JSON object", param="body")
    else:
        item.body = body


def read_done(path: str) -> tuple[dict, set]:
    """custom_id -> record and line numbers of id-less error lines already in the output `path`.

    A last line without its newline (a crash mid-write) is cut off the file so appending stays well formed.
    """
    done: dict = {}
    lines: set = set()
    if not os.path.exists(path):
        return done, lines
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    for raw in data.decode("utf-8", errors="replace").splitlines():
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("%s: ignoring an unreadable output line", path)
            continue
        if not isinstance(rec, dict):
            continue
        cid = rec.get("custom_id")
        if isinstance(cid, str) and cid:
            if cid not in done or (done[cid].get("error") is not None and rec.get("error") is None):
                done[cid] = rec  # a repeated custom_id's error line must not hide its answered line
        elif isinstance(rec.get("error"), dict) and isinstance(rec["error"].get("line"), int):
            lines.add(rec["error"]["line"])
    return done, lines


# --------------------------------------------------------------------------------------------------
# The server's request model and error mapping
# --------------------------------------------------------------------------------------------------

def _validation_error(err: APIError) -> dict:
    """The server's 400 for a request that breaks a rule of serving.openai."""
    return dict(status=err.status, message=err.message, param=err.param, code=err.code)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.generated = 0
        self._last = 0.0
        self.bar = None
        if enabled and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, desc="batch")

    def tokens(self, n: int):
        with self.lock:
            self.generated += n
            now = time.perf_counter()
            if self.bar is not None and now - self._last > 0.25:
                self._last = now
                self.bar.set_postfix_str(f"{self.generated / max(now - self.t0, 1e-9):.1f} gen tok/s",
                                         refresh=True)

    def request_done(self):
        with self.lock:
            if self.bar is not None:
                now = time.perf_counter()
                self.bar.set_postfix_str(f"{self.generated / max(now - self.t0, 1e-9):.1f} gen tok/s",
                                         refresh=False)
                self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class BatchRunner:
    """Runs parsed lines against one engine and appends records to an output file."""

    def __init__(self, engine, out_file, *, concurrency: int, served_model_name: str | None = None,
                 progress: bool = True, output: OutputConfig | None = None):
        self.engine = engine
        self.output = output or OutputConfig()
        self.out = out_file
        self.concurrency = max(1, int(concurrency))
        self.model_name = served_model_name or getattr(engine, "model_name", None) or "default"
        self.accepted_models = {self.model_name, getattr(engine, "model_name", self.model_name)}
        self.lp_fmt = LogprobFormatter(engine.tokenizer)
        self.progress_enabled = progress
        self.write_lock = threading.Lock()
        self.stop = threading.Event()
        self.active: set = set()
        self.stats = dict(requests=0, skipped=0, succeeded=0, errors=0, prompt_tokens=0, cached_tokens=0,
                          completion_tokens=0)

    def _drain(self, handle):
        with self.write_lock:
            self.active.add(handle)
        try:
            for delta in handle:
                self._progress.tokens(len(delta.token_ids))
            return handle.result()
        finally:
            with self.write_lock:
                self.active.discard(handle)

    # ------------------------------------------------------------------ output
    def _write(self, rec: dict):
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self.write_lock:
            self.out.write(line)
            self.out.flush()
            if rec.get("error") is not None:
                self.stats["errors"] += 1
            else:
                self.stats["succeeded"] += 1
                u = rec["response"]["body"]["usage"]
                self.stats["prompt_tokens"] += u["prompt_tokens"]
                self.stats["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
                self.stats["completion_tokens"] += u["completion_tokens"]

    # ------------------------------------------------------------------ one request
    def _api_error(self, item: _Line, *, status: int, message: str, type: str | None = None,
                   param: str | None = None, code: str | None = None) -> dict:
        return _error_record(item.custom_id, item.lineno, code or type or bodies.error_type(status), message,
                             status=status, type=type, param=param)

    def _from_exception(self, item: _Line, exc: BaseException) -> dict:
        e = as_api_error(exc)
        return self._api_error(item, status=e.status, message=e.message, type=e.type, param=e.param, code=e.code)

    def _validate(self, body: dict):
        """(request model, None) or (None, error kwargs): the server's rules and limits (serving.openai), token
        ids against this engine's vocabulary."""
        try:
            return parse_request(ChatCompletionRequest, body,
                                 vocab_size=engine_vocab_size(self.engine) or None), None
        except APIError as e:
            return None, _validation_error(e)

    def _submit(self, fn, *args, **kw):
        from serving.errors import Overloaded
        for attempt in range(_OVERLOADED_RETRIES):
            try:
                return fn(*args, **kw)
            except Overloaded:
                if attempt == _OVERLOADED_RETRIES - 1:
                    raise
                time.sleep(min(0.05 * 2 ** attempt, 1.0))

    def _run_one(self, item: _Line, req, history: list[dict] | None) -> dict:
        if req.model and req.model not in self.accepted_models:
            return self._api_error(item, status=404, param="model", code="model_not_found",
                                   message=f"the model {req.model!r} does not exist; this server serves "
                                           f"{self.model_name!r}")
        try:
            plan = plan_chat(req, self.output)
        except Exception as e:
            return self._from_exception(item, e)
        messages = _with_history(history, plan.messages) if history else plan.messages
        created = int(time.time())
        try:
            handles = self._submit(self.engine.chat_streams, messages, plan.n, conversation_id=req.conversation_id,
                                   cache_salt=req.cache_salt, template_kwargs=plan.template_kwargs, **plan.sampling)
        except Exception as e:
            return self._from_exception(item, e)
        results = [self._drain(h) for h in handles]
        for result in results:
            if result.finish_reason == "error":
                return self._api_error(item, status=500, code="generation_error",
                                       message=f"generation failed: {result.error or 'engine error'}")
            if result.finish_reason == "abort":
                return self._api_error(item, status=503, code="aborted", message="the request was aborted")
        choices = [choice(ChoiceOutput(plan, h.prompt_tail(), i), res,
                          {"content": self.lp_fmt.chat(res.logprobs or [])} if req.logprobs else None)
                   for i, (h, res) in enumerate(zip(handles, results))]
        body = bodies.chat_completion(choices, results, model=self.model_name, created=created)
        handle = handles[0]
        return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": item.custom_id,
                "response": {"status_code": 200, "request_id": handle.request_id, "body": body}, "error": None}

    # ------------------------------------------------------------------ one conversation
    def _run_group(self, items: list[_Line]):
        history: list[dict] = []   # turns done in an earlier run, which this engine may not hold
        for item in items:
            if item.prev is not None:
                _extend_history(history, item, item.prev, self)
                continue
            if self.stop.is_set():
                return
            try:
                if item.error is not None:
                    rec = item.error
                else:
                    req, err = self._validate(item.body)
                    if err is not None:
                        rec = self._api_error(item, **err)
                    else:
                        rec = self._run_one(item, req, history)
                        if rec["error"] is None and req.conversation_id is not None:
                            history = []  # the engine now holds the whole conversation
            except Exception as e:  # never let one line stop the run
                log.exception("line %d failed", item.lineno)
                rec = self._from_exception(item, e)
            if self.stop.is_set() and rec.get("error") and rec["error"]["code"] == "aborted":
                return  # interrupted: leave the line for the next run
            self._write(rec)
            self._progress.request_done()

    def run(self, items: list[_Line]) -> dict:
        t0 = time.perf_counter()
        self.stats["requests"] = len(items)
        self.stats["skipped"] = sum(it.prev is not None for it in items)
        groups: dict = {}
        order: list = []
        for it in items:
            k = it.key if it.key is not None else ("line", it.lineno)
            if k not in groups:
                groups[k] = []
                order.append(k)
            groups[k].append(it)
        todo = [k for k in order if any(it.prev is None for it in groups[k])]
        self._progress = _Progress(len(items) - self.stats["skipped"], self.progress_enabled)
        interrupted = False
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="batch-conv") as pool:
                futures = [pool.submit(self._run_group, groups[k]) for k in todo]
                try:
                    for f in futures:
                        while True:
                            try:
                                f.result(timeout=0.2)
                                break
                            except TimeoutError:
                                continue
                except KeyboardInterrupt:
                    interrupted = True
                    self.stop.set()
                    for f in futures:
                        f.cancel()
                    with self.write_lock:
                        for h in list(self.active):
                            h.abort()
        finally:
            self._progress.close()
        wall = time.perf_counter() - t0
        s = dict(self.stats, wall_s=wall, interrupted=interrupted)
        s["generated_tokens_per_s"] = s["completion_tokens"] / wall if wall > 0 else 0.0
        s["tokens_per_s"] = (s["prompt_tokens"] - s["cached_tokens"] + s["completion_tokens"]) / wall if wall else 0.0
        return s


def _with_history(history: list[dict], messages: list[dict]) -> list[dict]:
    """The messages to send for the first turn run after turns done in an earlier run: the request as is when
    it already carries the history (full or edited), else the done history followed by the new suffix."""
    k = len(history)
    if messages[:k] == history or (messages and messages[0] == history[0] and len(messages) > 1):
        return messages
    return history + messages


def _extend_history(history: list[dict], item: _Line, prev: dict, runner: BatchRunner) -> None:
    """Add a turn done in an earlier run to the history its conversation committed (as the engine records it)."""
    if not prev or prev.get("error") is not None or item.body is None or item.key is None:
        return
    try:
        req, err = runner._validate(item.body)
        content = prev["response"]["body"]["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return
    if err is not None:
        return
    msgs = _with_history(history, [m.to_engine() for m in req.messages]) if history else \
        [m.to_engine() for m in req.messages]
    history[:] = msgs + [{"role": "assistant", "content": content or ""}]


def run_batch(input_path: str, output_path: str, engine, *, concurrency: int | None = None,
              served_model_name: str | None = None, progress: bool = True,
              output: OutputConfig | None = None) -> dict:
    """Run the requests of `input_path` on `engine`, appending to `output_path`; returns the summary dict."""
    done, done_lines = read_done(output_path)
    with open(input_path, encoding="utf-8", errors="replace") as f:
        items = parse_lines(f.read().splitlines(), done, done_lines)
    if concurrency is None:
        concurrency = getattr(engine, "max_num_seqs", 8)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as out:
        runner = BatchRunner(engine, out, concurrency=concurrency, served_model_name=served_model_name,
                             progress=progress, output=output)
        return runner.run(items)


def format_summary(s: dict) -> str:
    ran = s["requests"] - s["skipped"]
    lines = [f"requests: {s['requests']} in the input, {s['skipped']} already done, {ran} run "
             f"({s['succeeded']} ok, {s['errors']} errors)"
             + (" -- interrupted; run again to resume" if s.get("interrupted") else ""),
             f"tokens: prompt {s['prompt_tokens']} (cached {s['cached_tokens']}), generated {s['completion_tokens']}",
             f"wall time: {s['wall_s']:.2f} s; {s['generated_tokens_per_s']:.1f} generated tok/s, "
             f"{s['tokens_per_s']:.1f} computed tok/s (uncached prompt + generated)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

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


if __name__ == "__main__":
    sys.exit(main())
