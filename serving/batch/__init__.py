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

* lines.py     the input lines and their line-level errors, the error record, what an earlier run left in the output
* runner.py    `BatchRunner` (one thread per conversation, one engine) and `run_batch`
* progress.py  the progress bar and the summary
* cli.py       the command line (`build_parser`, `main`); __main__.py runs it
"""
from __future__ import annotations

from serving.batch.cli import build_parser, main
from serving.batch.progress import format_summary
from serving.batch.runner import BatchRunner, run_batch

__all__ = ["BatchRunner", "build_parser", "format_summary", "main", "run_batch"]
