"""The engine: the public API over continuous batching with the exact conversation cache (docs/engine_api.md).

One loop thread owns the device cache; callers submit requests from any thread and read their tokens from a
`RequestHandle`. The work is split by concern:
  scheduler.py        admission, growth, preemption, the rows of each step
  cache_manager.py    attach / reserve / commit / release, eviction and the host tier (steps 4 and 7)
  model_runner.py     buckets, warm-up, batch building, step dispatch (steps 5 and 6)
  output_processor.py detokenize, stop strings, logprobs, stream deltas
  engine_loop.py      the loop thread: steps, reading tokens, finishing and settling requests, recovery
Each loop iteration admits waiting requests, dispatches the next decode step before reading the previous one's
tokens (the device never waits for Python), then runs one chunked-prefill step for requests still consuming
their prompt, and finishes requests (commit on success, release on failure or abort).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import queue
import threading
import jax
import numpy as np

import hybrid_jax
from hybrid_jax import ledger as L
from hybrid_jax.loader import read_config
from hybrid_jax.memory import device_memory_bytes, param_bytes, parse_bytes, plan_cache
from hybrid_jax.sharding import shard_model
from hybrid_jax.stack import stack_layers
from serving import cpu_dtype
from serving.adjust import AdjustBuilder
from serving.cache_manager import MISS_CAUSES, CacheManager
from serving.conversations import ConversationLedger
from serving.engine_loop import EngineLoop
from serving.errors import BadRequest, Overloaded, PromptTooLong
from serving.model_runner import ModelRunner
from serving.output_processor import OutputProcessor
from serving.request import (MAX_N, ChatResult, Request, SamplingParams, StreamDelta, TokenLogprob,
                             generation_defaults)
from serving.request_handle import RequestHandle
from serving.scheduler import Scheduler
from serving.tokenizer import IncrementalDecoder, load_tokenizer
from serving.turns import chat_request, conversation_key, conversation_request, validate_messages, validate_salt

log = logging.getLogger("serving.engine")

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")
CACHE_MODES = ("exact", "align", "none")
__all__ = ["CACHE_MODES", "ChatResult", "Engine", "RequestHandle", "SamplingParams", "StreamDelta", "TokenLogprob"]


def default_batched_tokens() -> int:
    """Tokens a step may hold while streams decode (a prefill chunk shares them with the decode rows). On a
    GPU a decode step is bound by memory and a chunk of a few hundred tokens costs about the same; on a CPU
    compute is the bound, so chunks stay small there to keep inter-token gaps short."""
    return 64 if jax.default_backend() == "cpu" else 2048


class _NullMetrics:
    def observe_ttft(self, s): ...
    def observe_itl(self, s): ...
    def observe_e2e(self, s): ...


class Engine(EngineLoop):
    """See docs/engine_api.md. Construct with Engine.from_pretrained."""

    def __init__(self, cfg, params, tokenizer, *, cache_mode="exact", block_size=16, max_model_len=2048,
                 max_num_seqs=8, num_blocks=None, num_slots=None, kv_memory=None, gpu_memory_utilization=None,
                 max_prefill_tokens=256, max_prefill_rows=4, max_num_batched_tokens=None, max_waiting=1024,
                 host_cache_memory="1GiB",
                 model_name="default", metrics=None, async_scheduling=True, delivery_timeout=120.0,
                 conversation_ttl=86400.0, max_conversations=100_000, tensor_parallel_size=1):
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
        params = stack_layers(params, cfg)
        # tensor parallel: cfg in the sharded layout, params placed over the mesh (hybrid_jax/sharding.py)
        cfg, params = shard_model(cfg, params, int(tensor_parallel_size))
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.model_dir: str | None = None
        self.cache_mode, self.block_size = cache_mode, int(block_size)
        self.max_model_len, self.max_num_seqs = int(max_model_len), int(max_num_seqs)
        self.model_name, self.metrics = model_name, metrics or _NullMetrics()
        self.max_waiting = max_waiting
        dtype = params["embed"].dtype
        self.plan = plan_cache(cfg, dtype=dtype, block_size=self.block_size, max_model_len=self.max_model_len,
                               max_num_seqs=self.max_num_seqs, slots_per_seq=2 if cache_mode == "align" else 1,
                               kv_memory=parse_bytes(kv_memory), gpu_memory_utilization=gpu_memory_utilization,
                               device_memory=device_memory_bytes(), weight_bytes=param_bytes(params),
                               num_blocks=num_blocks, num_slots=num_slots)
        log.info("cache plan: %s", self.plan.describe())
        self._counters = dict(prompt_tokens=0, cached_prompt_tokens=0, generation_tokens=0, hits=0, misses=0,
                              evictions=0, offloads=0, host_restores=0, requests_finished=0, preemptions=0,
                              conversations_expired=0, **{"miss_" + c: 0 for c in MISS_CAUSES})
        table_width = L.blocks_for(self.max_model_len, self.block_size)
        self.caches = CacheManager(cfg, self.plan, dtype, cache_mode, parse_bytes(host_cache_memory) or 0,
                                   self._counters, table_width)
        self.conversations = ConversationLedger()
        self.output = OutputProcessor(tokenizer, set(tokenizer.eos_token_ids) | set(cfg.eos_token_ids),
                                      self.max_model_len)
        adjust = AdjustBuilder(cfg.vocab_size, self.output.stop_ids,
                               lambda matchers, allowed, rows: self.grammar.fill(matchers, allowed, rows))
        self.runner = ModelRunner(cfg, params, self.caches, max_num_seqs=self.max_num_seqs,
                                  max_prefill_tokens=max_prefill_tokens, max_prefill_rows=max_prefill_rows,
                                  table_width=table_width, adjust=adjust)
        self.scheduler = Scheduler(self.caches, self.output, max_num_seqs=self.max_num_seqs,
                                   max_prefill_tokens=self.runner.max_prefill_tokens,
                                   max_prefill_rows=self.runner.prefill_rows,
                                   max_num_batched_tokens=max_num_batched_tokens or default_batched_tokens(),
                                   block_size=self.block_size,
                                   ahead=async_scheduling and cache_mode != "align", counters=self._counters)
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._inflight = None   # (Sampled, {request: row}) of the decode step dispatched last
        self._held: dict = {}   # finished two-phase requests awaiting settle -> deadline
        self._step_rows: list = []  # the requests of the step being built or run (a failure is theirs)
        self.conversation_ttl, self.max_conversations = conversation_ttl or None, max_conversations or None
        self._next_sweep = self._next_purge = 0.0
        self.delivery_timeout = float(delivery_timeout)
        self.sampling_defaults: dict = {}  # fields a request leaves out (from_pretrained's generation_config)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | None = None, *, dtype: str = "auto", served_model_name=None,
                        chat_template: str | None = None, generation_config: str | None = "auto",
                        tokenizer: str | None = None, **kw):
        """dtype "auto" takes the checkpoint's torch_dtype (bfloat16 for the real models; on a CPU float32 where it
        fits, serving/cpu_dtype.py); tokenizer (a directory) replaces the checkpoint's, read before any weight;
        chat_template (a jinja file or the template itself) replaces the checkpoint's; generation_config ("auto":
        the checkpoint's generation_config.json, "vllm": none, or a directory) gives the sampling defaults."""
        model_dir = path or DEFAULT_MODEL_DIR
        tp = int(kw.get("tensor_parallel_size", 1))  # > 1: read to the host, sharded in __init__
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"checkpoint directory {model_dir!r} does not exist")
        try:
            tok = load_tokenizer(tokenizer or model_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; give the model directory its tokenizer (tokenizer.json and "
                                    "tokenizer_config.json) or pass --tokenizer DIR") from None
        stored = hybrid_jax.from_hf(read_config(model_dir)).torch_dtype
        dtype = cpu_dtype.for_checkpoint(model_dir, dtype, stored)  # "auto" on a CPU: float32 where it fits
        cfg, params = hybrid_jax.load_pretrained(model_dir, dtype=dtype, stacked=True, on_host=tp > 1)
        if chat_template is not None:  # a jinja file or the template itself
            tok.chat_template = (open(chat_template).read() if os.path.isfile(chat_template) else chat_template)
        name = served_model_name or (os.path.basename(os.path.normpath(path)) if path else "hybrid-tiny-default")
        defaults = generation_defaults(generation_config, model_dir)
        engine = cls(cfg, params, tok, model_name=name, **kw)
        engine.model_dir = model_dir  # what the saved-state fingerprint hashes
        engine.sampling_defaults = defaults
        if defaults:
            log.info("sampling defaults from generation_config.json: %s", defaults)
        return engine

    # the device state, for persistence (serving/persist.py) and tests
    @property
    def cache(self):
        return self.caches.cache

    @cache.setter
    def cache(self, value):
        self.caches.cache = value

    @property
    def ledger(self):
        return self.caches.ledger

    @ledger.setter
    def ledger(self, value):
        self.caches.ledger = value

    def warmup(self, progress: bool = True, first_only: bool = False) -> dict:
        """Compile every step shape the engine can meet (before serving; see ModelRunner.shapes), or (first_only)
        those a first short request needs, leaving the rest to a background thread (ModelRunner.warmup)."""
        info = self._call(lambda: self.runner.warmup(progress, first_only=first_only) | self.caches.warmup())
        if first_only:  # after the cache's programs: the background compiles do not delay being ready
            self.runner.compile_rest_in_background()
        return info

    # ---------------------------------------------------------------- public calls
    def chat(self, messages, conversation_id=None, cache_salt=None, **sampling) -> ChatResult:
        return self.chat_stream(messages, conversation_id, cache_salt, **sampling).result()

    def chat_stream(self, messages, conversation_id=None, cache_salt=None, two_phase=False,
                    **sampling) -> RequestHandle:
        """Submit a chat turn. With two_phase=True the finished turn is committed only when the caller settles
        it (handle.settle(True), once the answer was delivered); otherwise it commits when it finishes."""
        return self.chat_streams(messages, 1, conversation_id, cache_salt, two_phase, **sampling)[0]

    def chat_streams(self, messages, n: int, conversation_id=None, cache_salt=None, two_phase=False,
                     template_kwargs: dict | None = None, **sampling) -> list[RequestHandle]:
        """Submit a chat turn with n choices: the prompt is computed once and its state forked n ways (choice i
        samples with seed + i when a seed is given). Choice 0 is the conversation's turn; the others are kept as
        anonymous checkpoints of the same salt. template_kwargs reach the chat template (tools,
        enable_thinking, ...)."""
        sp = SamplingParams.create(**(self.sampling_defaults | sampling))
        msgs = validate_messages(messages)
        render = dict(template_kwargs or {})
        if conversation_id is None:
            req = chat_request(self.tokenizer, self._rid("chatcmpl"), msgs, sp, validate_salt(cache_salt), render)
            return self._submit(req, two_phase, n)
        key = conversation_key(conversation_id, cache_salt)
        conv = self.conversations.lease(key, whole_history=any(m["role"] == "assistant" for m in msgs))
        try:
            req = conversation_request(self.tokenizer, self._rid("chatcmpl"), key, conv, msgs, sp, render)
            return self._submit(req, two_phase, n)
        except BaseException:
            self.conversations.finish(key, ok=False)
            raise

    def complete(self, prompt, conversation_id=None, cache_salt=None, **sampling) -> ChatResult:
        return self.complete_stream(prompt, conversation_id, cache_salt, **sampling).result()

    def complete_stream(self, prompt, conversation_id=None, cache_salt=None, two_phase=False,
                        **sampling) -> RequestHandle:
        """Raw completion. With a conversation_id, prompt continues the conversation's committed tokens
        (no chat template): the turn computes only the new tokens."""
        return self.complete_streams(prompt, 1, conversation_id, cache_salt, two_phase, **sampling)[0]

    def complete_streams(self, prompt, n: int, conversation_id=None, cache_salt=None, two_phase=False,
                         **sampling) -> list[RequestHandle]:
        """complete_stream with n choices over one computation of the prompt (as chat_streams)."""
        sp = SamplingParams.create(**(self.sampling_defaults | sampling))
        ids = self._prompt_ids(prompt)
        if conversation_id is None:
            return self._submit(Request(self._rid("cmpl"), ids, sp, salt=validate_salt(cache_salt)), two_phase, n)
        key = conversation_key(conversation_id, cache_salt)
        conv = self.conversations.lease(key)
        try:
            prior = conv.ids if conv is not None else []
            msgs = conv.messages if conv is not None else []
            return self._submit(Request(self._rid("cmpl"), list(prior) + ids, sp, key=key, salt=key[0],
                                        new_messages=msgs, raw_turn=True), two_phase, n)
        except BaseException:
            self.conversations.finish(key, ok=False)
            raise

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= self.cfg.vocab_size for t in ids):
                raise BadRequest(f"token ids must be in [0, {self.cfg.vocab_size})", param="prompt")
        else:
            raise BadRequest("prompt must be a string or a list of token ids", param="prompt")
        if not ids:
            raise BadRequest("prompt is empty", param="prompt")
        return ids

    def get_conversation(self, conversation_id, cache_salt=None) -> dict | None:
        key = conversation_key(conversation_id, cache_salt)
        conv = self.conversations.get(key)
        if conv is None:
            return None
        return {"conversation_id": conversation_id, "turns": conv.turns, "tokens": len(conv.ids),
                "cached_tokens": self._call(lambda: self.caches.head_length(key)), "last_used": int(conv.last_used),
                "messages": len(conv.messages)}

    def list_conversations(self, cache_salt=None) -> list[dict]:
        """The conversations of one salt (as get_conversation describes them), most recently used first."""
        salt = validate_salt(cache_salt)
        keys = self.conversations.keys(salt)
        out = [self.get_conversation(k[1], salt) for k in keys]
        return sorted((c for c in out if c is not None), key=lambda c: -c["last_used"])

    def delete_conversation(self, conversation_id, cache_salt=None) -> bool:
        """Forget a conversation and every checkpoint it committed, atomically with respect to new turns: it
        runs on the loop thread, so no request is admitted between the two, and once it returns no request
        can attach the deleted state."""
        key = conversation_key(conversation_id, cache_salt)

        def delete() -> bool:
            if not self.conversations.delete(key):
                return False
            self.caches.drop_conversation(key)
            return True
        return self._call(delete)

    def stats(self) -> dict:
        s = self.scheduler
        programs = self.runner.programs
        return dict(self._counters, running=len(s.running), waiting=len(s.waiting) + self._inbox.qsize(),
                    step_programs_compiled=programs.ready(), step_programs_total=len(programs.shapes),
                    **self.caches.stats())

    def save_state(self, directory: str) -> str:
        from serving import persist
        return self._call(lambda: persist.save(self, directory))

    def load_state(self, directory: str) -> bool:
        from serving import persist
        return self._call(lambda: persist.load(self, directory))

    def use_state_db(self, target: str, owner: str | None = None) -> str:
        """Keep the conversations in the state database `target` (a `postgresql://` URL, an SQLite file, or a
        directory: its state.db), shared with every replica that opens it (serving/journal.py); returns its
        description. Call before serving; `shutdown` closes it."""
        from serving.journal import Journal
        from serving.store import StateStore
        self.conversations.journal = Journal(StateStore.open(target), owner)
        return self.conversations.journal.store.description

    def shutdown(self) -> None:
        self.runner.programs.stop()
        self._stop = True
        self._wake()
        self._thread.join(timeout=30)
        if self.caches.disk is not None:
            self.caches.disk.close()  # the queued write-behinds land before the process goes
        if self.conversations.journal is not None:
            self.conversations.journal.close()

    # ---------------------------------------------------------------- request building
    def _rid(self, prefix):
        return f"{prefix}-{next(self._ids):08d}{os.getpid() % 10000:04d}"

    def _submit(self, req: Request, two_phase: bool = False, n: int = 1) -> list[RequestHandle]:
        n_prompt = len(req.prompt_ids)
        if n_prompt >= self.max_model_len:
            raise PromptTooLong(f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {n_prompt} tokens (room is needed for at least one generated token)",
                                param="messages")
        if not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise BadRequest(f"n must be an integer in [1, {MAX_N}]", param="n")
        if len(self.scheduler.waiting) + self._inbox.qsize() + n > self.max_waiting:
            raise Overloaded("too many waiting requests; retry later")
        if any(t >= self.cfg.vocab_size for t, _ in req.sp.logit_bias):
            raise BadRequest(f"logit_bias: token ids must be in [0, {self.cfg.vocab_size})", param="logit_bias")
        need, usable = self.scheduler.group_slots(n, n_prompt), self.caches.usable_slots
        if need > usable:
            most = max(k for k in range(1, MAX_N + 1) if self.scheduler.group_slots(k, n_prompt) <= usable)
            raise BadRequest(f"n={n} needs {need} state slots at once (each choice holds one until the answer is "
                             f"delivered, plus the shared prompt state); this server has {usable} (--num-slots): "
                             f"n can be at most {most}", param="n")
        req.group_slots = need if n > 1 else 0
        reqs = [req] + [self._sibling(req, i) for i in range(1, n)]
        if n > 1 and self.cache_mode == "exact" and n_prompt > 1:
            req.boundaries = tuple(sorted(set(req.boundaries) | {n_prompt - 1}))  # the state the siblings fork
        for r in reqs:
            r.decoder = IncrementalDecoder(self.tokenizer)
            r.two_phase = bool(two_phase)
            if r.sp.logprobs:
                r.logprobs = []
            if r.sp.grammar is not None:
                r.matcher = self._matcher(r.sp.grammar)
        for r in reqs:
            self._inbox.put(r)
        return [RequestHandle(self, r) for r in reqs]

    def _sibling(self, leader: Request, i: int) -> Request:
        """Choice i of an n > 1 request: the leader's prompt under the leader's salt, admitted once the leader has
        checkpointed the prompt's state (it then computes only the prompt's last token)."""
        sp = leader.sp if leader.sp.seed is None else dataclasses.replace(leader.sp, seed=leader.sp.seed + i)
        return Request(f"{leader.rid}-{i}", list(leader.prompt_ids), sp, salt=leader.salt, leader=leader)

    # the limits on output constraints (serving.grammar.GrammarLimits; None: its defaults), read when the grammar
    # engine is built on first use: `python -m serving` sets them from its flags
    grammar_limits = None
    # the request field a constraint of each kind comes from (regex, choice, lark: structured_outputs/guided_*)
    _CONSTRAINT_PARAMS = {"json_object": "response_format", "json_schema": "response_format", "tool_calls": "tools"}

    def _matcher(self, spec):
        """The request's grammar matcher (compiled on the grammar engine's threads, at most its compile timeout:
        never call this on an event loop); BadRequest naming the constraint's field if it cannot be compiled."""
        from serving.grammar import GrammarError
        try:
            return self.grammar.matcher(spec)
        except GrammarError as e:
            raise BadRequest(f"the output constraint cannot be compiled: {e}",
                             param=self._CONSTRAINT_PARAMS.get(spec.kind, "structured_outputs")) from None

    @functools.cached_property
    def grammar(self):
        """The grammar engine (structured outputs), built on first use."""
        from serving.grammar import GrammarCompiler
        return GrammarCompiler(self.tokenizer, self.cfg.vocab_size, stop_token_ids=sorted(self.output.eos),
                               limits=self.grammar_limits)
