"""Running parsed batch lines against one engine (`BatchRunner`, `run_batch`): the lines of one conversation one
after another in file order, conversations concurrently, each request validated and answered as
`POST /v1/chat/completions` answers it (serving/openai: the request model, the model check, the error shape and
the chat.completion body), one output record per line, appended as it finishes."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from serving.batch.lines import Line, error_record, parse_lines, read_done
from serving.batch.progress import Progress
from serving.errors import Overloaded
from serving.openai import bodies
from serving.openai.chat_output import ChoiceOutput, OutputConfig, choice, plan_chat
from serving.openai.errors import APIError, as_api_error, check_model, finish_error
from serving.openai.logprobs import LogprobFormatter
from serving.openai.parse import engine_vocab_size, parse_request, served_names
from serving.openai.requests import ChatCompletionRequest

log = logging.getLogger("serving.batch")

_OVERLOADED_RETRIES = 50


class BatchRunner:
    """Runs parsed lines against one engine and appends records to an output file."""

    def __init__(self, engine, out_file, *, concurrency: int, served_model_name: str | None = None,
                 progress: bool = True, output: OutputConfig | None = None):
        self.engine = engine
        self.output = output or OutputConfig()
        self.out = out_file
        self.concurrency = max(1, int(concurrency))
        self.model_name, self.accepted_models = served_names(engine, served_model_name)
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
    @staticmethod
    def _error(item: Line, exc: BaseException) -> dict:
        """The error record of a line, in the server's error shape for `exc` (serving/openai/errors.py)."""
        return error_record(item.custom_id, item.lineno, as_api_error(exc))

    def validate(self, body: dict):
        """The request model of a body; APIError(400) as the server raises it (serving.openai: its rules and
        limits, token ids against this engine's vocabulary)."""
        return parse_request(ChatCompletionRequest, body, vocab_size=engine_vocab_size(self.engine) or None)

    def _submit(self, fn, *args, **kw):
        """Call the engine, retrying with backoff while it is overloaded."""
        for attempt in range(_OVERLOADED_RETRIES):
            try:
                return fn(*args, **kw)
            except Overloaded:
                if attempt == _OVERLOADED_RETRIES - 1:
                    raise
                time.sleep(min(0.05 * 2 ** attempt, 1.0))

    def _run_one(self, item: Line, req, history: list[dict] | None) -> dict:
        try:
            check_model(req.model, self.accepted_models, self.model_name)
            plan = plan_chat(req, self.output)
        except Exception as e:
            return self._error(item, e)
        messages = _with_history(history, plan.messages) if history else plan.messages
        created = int(time.time())
        try:
            handles = self._submit(self.engine.chat_streams, messages, plan.n, conversation_id=req.conversation_id,
                                   cache_salt=req.cache_salt, template_kwargs=plan.template_kwargs, **plan.sampling)
        except Exception as e:
            return self._error(item, e)
        results = [self._drain(h) for h in handles]
        for result in results:
            err = finish_error(result)
            if err is not None:
                return self._error(item, err)
        choices = [choice(ChoiceOutput(plan, h.prompt_tail(), i), res,
                          {"content": self.lp_fmt.chat(res.logprobs or [])} if req.logprobs else None)
                   for i, (h, res) in enumerate(zip(handles, results))]
        body = bodies.chat_completion(choices, results, model=self.model_name, created=created)
        handle = handles[0]
        return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": item.custom_id,
                "response": {"status_code": 200, "request_id": handle.request_id, "body": body}, "error": None}

    # ------------------------------------------------------------------ one conversation
    def _answer(self, item: Line, history: list[dict]) -> dict:
        """The record of one valid line (validated, run); clears `history` once the engine holds it all."""
        try:
            req = self.validate(item.body)
        except APIError as e:
            return self._error(item, e)
        rec = self._run_one(item, req, history)
        if rec["error"] is None and req.conversation_id is not None:
            history.clear()  # the engine now holds the whole conversation
        return rec

    def _run_group(self, items: list[Line]):
        history: list[dict] = []   # turns done in an earlier run, which this engine may not hold
        for item in items:
            if item.prev is not None:
                _extend_history(history, item, item.prev, self)
                continue
            if self.stop.is_set():
                return
            try:
                rec = item.error if item.error is not None else self._answer(item, history)
            except Exception as e:  # never let one line stop the run
                log.exception("line %d failed", item.lineno)
                rec = self._error(item, e)
            if self.stop.is_set() and rec.get("error") and rec["error"]["code"] == "aborted":
                return  # interrupted: leave the line for the next run
            self._write(rec)
            self._progress.request_done()

    def run(self, items: list[Line]) -> dict:
        t0 = time.perf_counter()
        self.stats["requests"] = len(items)
        self.stats["skipped"] = sum(it.prev is not None for it in items)
        self._progress = Progress(len(items) - self.stats["skipped"], self.progress_enabled)
        interrupted = False
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="batch-conv") as pool:
                futures = [pool.submit(self._run_group, group) for group in _groups(items)]
                try:
                    _wait(futures)
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
        return _summary(self.stats, time.perf_counter() - t0, interrupted)


def _groups(items: list[Line]) -> list[list[Line]]:
    """The lines of each conversation (a line without one is a group of its own) in file order, groups in the order
    of their first line; only groups with a line left to run."""
    groups: dict = {}
    for it in items:
        groups.setdefault(it.key if it.key is not None else ("line", it.lineno), []).append(it)
    return [g for g in groups.values() if any(it.prev is None for it in g)]


def _wait(futures) -> None:
    """Wait for every future, waking up often so that Ctrl-C is seen."""
    for f in futures:
        while True:
            try:
                f.result(timeout=0.2)
                break
            except TimeoutError:
                continue


def _summary(stats: dict, wall: float, interrupted: bool) -> dict:
    s = dict(stats, wall_s=wall, interrupted=interrupted)
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


def _extend_history(history: list[dict], item: Line, prev: dict, runner: BatchRunner) -> None:
    """Add a turn done in an earlier run to the history its conversation committed (as the engine records it)."""
    if not prev or prev.get("error") is not None or item.body is None or item.key is None:
        return
    try:
        req = runner.validate(item.body)
        content = prev["response"]["body"]["choices"][0]["message"]["content"]
    except (APIError, KeyError, IndexError, TypeError):
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
