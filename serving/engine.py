"""The engine: continuous batching over the exact conversation cache (steps 3-7 of DESIGN.md).

One loop thread owns the device cache and the cache ledger; callers submit requests from any thread and read
their tokens from a `RequestHandle`. Each iteration admits waiting requests (attach), runs one chunked-prefill
step for requests still consuming their prompt, one decode step for the others, samples, and finishes requests
(commit on success, discard on failure or abort).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import re
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import hybrid_jax
from hybrid_jax import ledger as L
from hybrid_jax import offload
from hybrid_jax.cache import bytes_per_block, bytes_per_slot, init_cache
from hybrid_jax.model import SpanBatch, make_steps
from hybrid_jax.sampling import SamplingBatch, sample
from serving.conversations import Conversation, ConversationLedger
from serving.errors import BadRequest, Overloaded, PromptTooLong
from serving.tokenizer import IncrementalDecoder, load_tokenizer, render_continuation

log = logging.getLogger("serving.engine")

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")
CACHE_MODES = ("exact", "align", "none")
ROLES = ("system", "user", "assistant", "developer", "tool")
_MAX_ID_LEN = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def create(cls, **kw) -> "SamplingParams":
        unknown = set(kw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BadRequest(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        kw = {k: v for k, v in kw.items() if v is not None or k == "seed"}
        stop = kw.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("stop must be a non-empty string or a list of them", param="stop")
        kw["stop"] = tuple(stop)
        kw["stop_token_ids"] = tuple(int(t) for t in kw.get("stop_token_ids", ()) or ())
        p = cls(**kw)
        checks = [(isinstance(p.max_tokens, int) and p.max_tokens >= 1, "max_tokens must be an integer >= 1"),
                  (0.0 <= p.temperature <= 2.0, "temperature must be in [0, 2]"),
                  (0.0 < p.top_p <= 1.0, "top_p must be in (0, 1]"),
                  (p.top_k == -1 or p.top_k >= 1, "top_k must be -1 (off) or >= 1"),
                  (0.0 <= p.min_p <= 1.0, "min_p must be in [0, 1]"),
                  (0 <= p.top_logprobs <= 5, "top_logprobs must be in [0, 5]")]
        for ok, msg in checks:
            if not ok:
                raise BadRequest(msg, param=msg.split()[0])
        return p


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclasses.dataclass
class StreamDelta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


class RequestHandle:
    """A submitted request: iterate for StreamDelta items; result() for the ChatResult; abort() to cancel."""

    def __init__(self, engine: "Engine", req: "_Request"):
        self._engine, self._req = engine, req
        self.request_id = req.rid

    @property
    def prompt_tokens(self) -> int:
        return len(self._req.prompt_ids)

    @property
    def cached_tokens(self) -> int:
        self._req.admitted.wait()
        return self._req.attached

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            item = self._req.out.get()
            if item is None:
                return
            yield item

    def result(self, timeout: float | None = None) -> ChatResult:
        if not self._req.done.wait(timeout):
            raise TimeoutError("request still running")
        return self._req.result

    def abort(self) -> None:
        self._req.aborted = True
        self._engine._wake()


@dataclasses.dataclass(eq=False)
class _Request:
    rid: str
    prompt_ids: list[int]
    sp: SamplingParams
    key: tuple | None = None                 # (cache_salt, conversation_id)
    new_messages: list[dict] | None = None   # committed messages of this turn on success
    new_seen: list[dict] | None = None       # the same, as the client saw them
    drop_committed: bool = False             # history disagreed with the ledger: recompute, do not attach
    raw_turn: bool = False                   # a raw completion turn: commits no assistant message
    pending: L.Pending | None = None
    attached: int = 0
    num_computed: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    text: str = ""                            # streamed so far
    raw: str = ""                             # decoded so far (may run past a stop string)
    logprobs: list[TokenLogprob] | None = None
    decoder: IncrementalDecoder | None = None
    aborted: bool = False
    t_arrival: float = dataclasses.field(default_factory=time.perf_counter)
    t_last: float = 0.0
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    admitted: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: ChatResult | None = None

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids) + max(len(self.generated) - 1, 0)


def _bucket(n: int, lo: int = 1, cap: int | None = None) -> int:
    """Shape bucket: lo * 4**k >= n (capped). Coarse buckets keep the number of compiled shapes small."""
    b = lo
    while b < n:
        b *= 4
    return min(b, cap) if cap is not None else b


def _parse_bytes(v) -> int | None:
    if v is None or isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(v), re.I)
    if not m:
        raise ValueError(f"cannot parse memory size {v!r} (e.g. 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


class _NullMetrics:
    def observe_ttft(self, s): ...
    def observe_itl(self, s): ...
    def observe_e2e(self, s): ...


class Engine:
    """See docs/engine_api.md. Construct with Engine.from_pretrained."""

    def __init__(self, cfg, params, tokenizer, *, cache_mode="exact", block_size=16, max_model_len=2048,
                 max_num_seqs=8, num_blocks=None, num_slots=None, kv_memory=None, max_prefill_tokens=256,
                 max_prefill_rows=4, max_waiting=1024, host_cache_memory="1GiB", model_name="default",
                 metrics=None):
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.cache_mode, self.block_size = cache_mode, int(block_size)
        self.max_model_len, self.max_num_seqs = int(max_model_len), int(max_num_seqs)
        self.model_name, self.metrics = model_name, metrics or _NullMetrics()
        self.max_prefill_tokens = _bucket(max_prefill_tokens, 16)
        self.max_prefill_rows = max(1, min(max_prefill_rows, max_num_seqs))
        self.max_waiting = max_waiting
        dtype = params["embed"].dtype
        self.table_width = L.blocks_for(self.max_model_len, self.block_size)
        per_seq_slots = 2 if cache_mode == "align" else 1
        if num_blocks is None:
            kv_memory = _parse_bytes(kv_memory)
            if kv_memory is None:
                # Default: room for max_num_seqs full-length sequences plus as many committed conversations.
                num_blocks = 2 * self.max_num_seqs * self.table_width + 1
            else:
                bb = max(bytes_per_block(cfg, self.block_size, dtype), 1)
                sb = bytes_per_slot(cfg, dtype)
                # Split memory so that one slot accompanies every ~8 blocks of conversation.
                num_blocks = max(int(kv_memory / (bb + sb / 8)), self.table_width + 1)
        if num_slots is None:
            num_slots = max(per_seq_slots * self.max_num_seqs + 1, num_blocks // 4) + 1
        if num_slots < per_seq_slots * self.max_num_seqs + 1:
            raise ValueError(f"num_slots={num_slots} is too small for max_num_seqs={self.max_num_seqs}")
        self.cache = init_cache(cfg, num_blocks=num_blocks, block_size=self.block_size, num_slots=num_slots,
                                dtype=dtype)
        self.ledger = L.new_ledger(num_blocks, num_slots, self.block_size)
        self.conversations = ConversationLedger()
        # Evicted committed turns wait here (LRU, bounded) and come back on their next hit.
        self.host_cache_bytes = _parse_bytes(host_cache_memory) or 0
        self._host: collections.OrderedDict = collections.OrderedDict()
        self._host_bytes = 0
        self._prefill, _, self._decode = make_steps(cfg)
        self._eos = set(tokenizer.eos_token_ids) | set(cfg.eos_token_ids)
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._counters = dict(prompt_tokens=0, cached_prompt_tokens=0, generation_tokens=0, hits=0, misses=0,
                              evictions=0, offloads=0, host_restores=0, requests_finished=0)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | None = None, *, dtype: str = "float32", served_model_name=None, **kw):
        model_dir = path or DEFAULT_MODEL_DIR
        cfg, params = hybrid_jax.load_pretrained(model_dir, dtype=dtype)
        tok = load_tokenizer(model_dir)
        name = served_model_name or (os.path.basename(os.path.normpath(path)) if path else "hybrid-tiny-default")
        return cls(cfg, params, tok, model_name=name, **kw)

    # ---------------------------------------------------------------- public calls
    def chat(self, messages, conversation_id=None, cache_salt=None, **sampling) -> ChatResult:
        return self.chat_stream(messages, conversation_id, cache_salt, **sampling).result()

    def chat_stream(self, messages, conversation_id=None, cache_salt=None, **sampling) -> RequestHandle:
        sp = SamplingParams.create(**sampling)
        msgs = _validate_messages(messages)
        if conversation_id is None:
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return self._submit(_Request(self._rid("chatcmpl"), list(ids), sp))
        key = _conversation_key(conversation_id, cache_salt)
        conv = self.conversations.lease(key)
        try:
            req = self._conversation_request(key, conv, msgs, sp)
            return self._submit(req)
        except BaseException:
            self.conversations.finish(key, ok=False)
            raise

    def complete(self, prompt, conversation_id=None, cache_salt=None, **sampling) -> ChatResult:
        return self.complete_stream(prompt, conversation_id, cache_salt, **sampling).result()

    def complete_stream(self, prompt, conversation_id=None, cache_salt=None, **sampling) -> RequestHandle:
        """Raw completion. With a conversation_id, prompt continues the conversation's committed tokens
        (no chat template): the turn computes only the new tokens."""
        sp = SamplingParams.create(**sampling)
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
        if conversation_id is None:
            return self._submit(_Request(self._rid("cmpl"), ids, sp))
        key = _conversation_key(conversation_id, cache_salt)
        conv = self.conversations.lease(key)
        try:
            prior = conv.ids if conv is not None else []
            msgs = conv.messages if conv is not None else []
            return self._submit(_Request(self._rid("cmpl"), list(prior) + ids, sp, key=key, new_messages=msgs,
                                         raw_turn=True))
        except BaseException:
            self.conversations.finish(key, ok=False)
            raise

    def get_conversation(self, conversation_id, cache_salt=None) -> dict | None:
        key = _conversation_key(conversation_id, cache_salt)
        conv = self.conversations.get(key)
        if conv is None:
            return None
        turn = self.ledger.turns.get(key)
        return {"conversation_id": conversation_id, "turns": conv.turns, "tokens": len(conv.ids),
                "cached_tokens": turn.length if turn else 0, "last_used": int(conv.last_used),
                "messages": len(conv.messages)}

    def delete_conversation(self, conversation_id, cache_salt=None) -> bool:
        key = _conversation_key(conversation_id, cache_salt)
        if not self.conversations.delete(key):
            return False
        def drop():
            self.ledger = L.evict(self.ledger, key)
            self._drop_host(key)
        self._call(drop)
        return True

    def stats(self) -> dict:
        led = self.ledger
        nb, ns = len(led.refcount) - 1, len(led.slots) - 1
        return dict(self._counters, running=len(self._running), waiting=len(self._waiting) + self._inbox.qsize(),
                    kv_blocks_total=nb, kv_blocks_used=nb - led.free_blocks, slots_total=ns,
                    slots_used=ns - led.free_slots, conversations=len(led.turns),
                    host_conversations=len(self._host), host_cache_bytes=self._host_bytes)

    def save_state(self, directory: str) -> str:
        from serving import persist
        return self._call(lambda: persist.save(self, directory))

    def load_state(self, directory: str) -> bool:
        from serving import persist
        return self._call(lambda: persist.load(self, directory))

    def shutdown(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- request building
    def _rid(self, prefix):
        return f"{prefix}-{next(self._ids):08d}{os.getpid() % 10000:04d}"

    def _conversation_request(self, key, conv: Conversation | None, msgs, sp) -> _Request:
        tok = self.tokenizer
        drop = False
        if conv is None:
            new_msgs, all_msgs = msgs, msgs
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        else:
            k = len(conv.messages)
            if msgs[:k] == conv.messages or msgs[:k] == conv.seen:  # the client resent the whole history
                new_msgs = msgs[k:]
            elif msgs[0] == conv.messages[0] and len(msgs) > 1:
                new_msgs = None                    # an edited or truncated history: a miss
            else:
                new_msgs = msgs
            cont = None
            if new_msgs:
                cont = render_continuation(tok, conv.messages, new_msgs, committed_ids=conv.ids)
            if cont is None:
                all_msgs = msgs if new_msgs is None or not new_msgs else conv.messages + new_msgs
                if new_msgs is not None and not new_msgs:
                    raise BadRequest("no new messages after the committed history", param="messages")
                ids = tok.apply_chat_template(all_msgs, add_generation_prompt=True, tokenize=True)
                drop = True
            else:
                all_msgs = conv.messages + new_msgs
                ids = list(conv.ids) + list(cont)
        seen = None if conv is None or drop else (conv.seen or conv.messages) + (new_msgs or [])
        return _Request(self._rid("chatcmpl"), list(ids), sp, key=key, new_messages=list(all_msgs),
                        new_seen=seen, drop_committed=drop)

    def _submit(self, req: _Request) -> RequestHandle:
        n = len(req.prompt_ids)
        if n >= self.max_model_len:
            raise PromptTooLong(f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {n} tokens (room is needed for at least one generated token)",
                                param="messages")
        if len(self._waiting) + self._inbox.qsize() >= self.max_waiting:
            raise Overloaded("too many waiting requests; retry later")
        req.decoder = IncrementalDecoder(self.tokenizer)
        if req.sp.logprobs:
            req.logprobs = []
        self._inbox.put(req)
        return RequestHandle(self, req)

    # ---------------------------------------------------------------- loop
    def _wake(self):
        self._inbox.put(None)

    def _call(self, fn: Callable[[], Any]):
        """Run fn on the loop thread (which owns the cache and ledger) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        box: dict = {}
        ev = threading.Event()
        self._inbox.put(("call", fn, box, ev))
        ev.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _drain(self, block: bool):
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Request):
                self._waiting.append(item)
            elif isinstance(item, tuple) and item[0] == "call":
                _, fn, box, ev = item
                try:
                    box["value"] = fn()
                except BaseException as e:  # handed back to the caller
                    box["error"] = e
                ev.set()
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self):
        while not self._stop:
            try:
                self._drain(block=not (self._waiting or self._running))
                self._reap_aborted()
                self._admit()
                self._prefill_step()
                self._decode_step()
            except Exception as e:  # never let one bad step kill the engine: fail the running requests
                log.exception("engine step failed")
                for req in list(self._running):
                    self._finish(req, "error", ok=False, error=f"{type(e).__name__}: {e}")
                if any(x.is_deleted() for x in jax.tree_util.tree_leaves(self.cache)):
                    # The failed step had been handed the (donated) cache: start over with an empty one. The
                    # conversations keep their messages and token ids, so their next turns recompute.
                    log.error("the device cache was lost in the failed step; continuing with an empty cache")
                    c = self.cache
                    self.cache = init_cache(self.cfg, num_blocks=c.num_blocks, block_size=c.block_size,
                                            num_slots=c.num_slots, dtype=self.params["embed"].dtype)
                    self.ledger = L.new_ledger(c.num_blocks, c.num_slots, self.block_size)
                    self._host.clear()
                    self._host_bytes = 0
        for req in self._waiting + self._running:
            self._finish(req, "abort", ok=False)

    def _reap_aborted(self):
        for req in [r for r in self._waiting if r.aborted]:
            self._waiting.remove(req)
            self._finish(req, "abort", ok=False)
        for req in [r for r in self._running if r.aborted]:
            self._finish(req, "abort", ok=False)

    # ---------------------------------------------------------------- admission (steps 3 and 4)
    def _busy_keys(self):
        return {r.key for r in self._running if r.key is not None}

    def _evict_one(self, keep=None) -> bool:
        victim = L.lru_victim(self.ledger, exclude=self._busy_keys() | {keep})
        if victim is None:
            return False
        if self.host_cache_bytes:
            host = offload.to_host(self.cache, self.ledger.turns[victim])
            if host.nbytes <= self.host_cache_bytes:
                self._host[victim] = host
                self._host_bytes += host.nbytes
                self._counters["offloads"] += 1
                while self._host_bytes > self.host_cache_bytes:  # oldest host copies go first
                    self._host_bytes -= self._host.popitem(last=False)[1].nbytes
        self.ledger = L.evict(self.ledger, victim)
        self._counters["evictions"] += 1
        return True

    def _drop_host(self, key):
        host = self._host.pop(key, None)
        if host is not None:
            self._host_bytes -= host.nbytes
        return host

    def _restore_from_host(self, key):
        """Bring an offloaded committed turn back to the device (a hit without recompute)."""
        host = self._drop_host(key)
        if host is None or key in self.ledger.turns:
            return
        try:
            self.ledger, self.cache = self._with_eviction(
                lambda: offload.from_host(self.ledger, self.cache, key, host), keep=key)
            self._counters["host_restores"] += 1
        except (L.OutOfBlocks, L.OutOfSlots):
            pass  # no room even after eviction: the turn recomputes

    def _with_eviction(self, op, keep=None):
        """Run a ledger operation, evicting least recently used committed turns (never `keep`'s) until it fits
        (I7). Operations raise before touching anything, so a retry starts clean."""
        while True:
            try:
                return op()
            except (L.OutOfBlocks, L.OutOfSlots):
                if not self._evict_one(keep):
                    raise

    def _admit(self):
        while self._waiting and len(self._running) < self.max_num_seqs:
            req = self._waiting[0]
            if req.drop_committed and req.key is not None:
                self.ledger = L.evict(self.ledger, req.key)
                self._drop_host(req.key)
            key = req.key if self.cache_mode != "none" else None
            align = self.cache_mode == "align"
            if key is not None:
                self._restore_from_host(key)
            try:
                self.ledger, self.cache, pending = self._with_eviction(
                    lambda: L.attach(self.ledger, self.cache, key, snapshot=align), keep=key)
                if pending.attached >= len(req.prompt_ids):
                    # The last prompt token must run to give the first logits; nothing to reuse then.
                    self.ledger = L.release(self.ledger, pending)
                    self.ledger, self.cache, pending = L.attach(self.ledger, self.cache, None, snapshot=align)
                try:
                    self.ledger, pending = self._with_eviction(
                        lambda: L.reserve(self.ledger, pending, len(req.prompt_ids)), keep=key)
                except L.OutOfBlocks:
                    self.ledger = L.release(self.ledger, pending)
                    raise
            except (L.OutOfBlocks, L.OutOfSlots) as e:
                if self._running:
                    return  # wait for running requests to free their state
                self._waiting.pop(0)
                self._finish(req, "error", ok=False, error=f"the cache pool is too small for this request: {e}")
                continue
            self._waiting.pop(0)
            req.pending, req.attached, req.num_computed = pending, pending.attached, pending.attached
            if req.key is not None:
                self._counters["hits" if pending.attached > 0 else "misses"] += 1
            self._counters["prompt_tokens"] += len(req.prompt_ids)
            self._counters["cached_prompt_tokens"] += pending.attached
            req.admitted.set()
            self._running.append(req)

    # ---------------------------------------------------------------- execution (steps 5 and 6)
    def _chunk_end(self, req: _Request, start: int, end: int) -> int:
        end = min(end, start + self.max_prefill_tokens)
        if self.cache_mode == "align":
            # Block-aligned engines keep hybrid state only at block boundaries: stop each chunk at one.
            boundary = (end // self.block_size) * self.block_size
            if boundary > start:
                end = boundary
        return end

    def _table(self, reqs: list[_Request], rows: int) -> np.ndarray:
        """Block tables [rows, width]; width is bucketed to the longest table, so attention reads only as many
        blocks as the batch's longest sequence needs (not max_model_len's worth)."""
        width = _bucket(max(len(r.pending.blocks) for r in reqs), 4, cap=self.table_width)
        t = np.zeros((rows, width), np.int32)
        for i, r in enumerate(reqs):
            t[i, :len(r.pending.blocks)] = r.pending.blocks
        return t

    def _prefill_step(self) -> bool:
        reqs = [r for r in self._running if r.in_prefill][:self.max_prefill_rows]
        if not reqs:
            return False
        spans = []
        for r in reqs:
            s = r.num_computed
            spans.append((s, self._chunk_end(r, s, len(r.prompt_ids))))
        rows = 1 if len(reqs) == 1 else self.max_prefill_rows
        T = _bucket(max(e - s for s, e in spans), 16, cap=self.max_prefill_tokens)
        tokens = np.zeros((rows, T), np.int32)
        start = np.zeros(rows, np.int32)
        length = np.zeros(rows, np.int32)
        slot = np.zeros(rows, np.int32)
        for i, (r, (s, e)) in enumerate(zip(reqs, spans)):
            tokens[i, :e - s] = r.prompt_ids[s:e]
            start[i], length[i], slot[i] = s, e - s, r.pending.slot
        batch = SpanBatch(jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(length), jnp.asarray(slot),
                          jnp.asarray(self._table(reqs, rows)))
        logits, self.cache = self._prefill(self.params, self.cache, batch)
        finished = []
        for i, (r, (s, e)) in enumerate(zip(reqs, spans)):
            r.num_computed = e
            self._maybe_snapshot(r)
            if e == len(r.prompt_ids):
                finished.append(i)
        if finished:
            self._sample_and_emit([r if i in finished else None for i, r in enumerate(reqs)], logits)
        return True

    def _maybe_snapshot(self, r: _Request):
        if self.cache_mode == "align" and r.num_computed % self.block_size == 0 and r.num_computed > 0:
            self.cache = L._copy_slot(self.cache, jnp.array([r.pending.slot]), jnp.array([r.pending.snap_slot]))
            r.pending = dataclasses.replace(r.pending, snap_len=r.num_computed)

    def _decode_step(self) -> bool:
        reqs = [r for r in self._running if not r.in_prefill and r.generated and not r.done.is_set()]
        if not reqs:
            return False
        ready = []
        for r in reqs:
            try:
                self.ledger, r.pending = self._with_eviction(
                    lambda: L.reserve(self.ledger, r.pending, r.num_computed + 1), keep=r.key)
                ready.append(r)
            except L.OutOfBlocks:
                self._finish(r, "length", ok=True)  # no room left to grow: end the turn as if at max length
        if not ready:
            return True
        rows = _bucket(len(ready), 1, cap=self.max_num_seqs)
        tokens = np.zeros((rows, 1), np.int32)
        start = np.zeros(rows, np.int32)
        length = np.zeros(rows, np.int32)
        slot = np.zeros(rows, np.int32)
        for i, r in enumerate(ready):
            tokens[i, 0], start[i], length[i], slot[i] = r.generated[-1], r.num_computed, 1, r.pending.slot
        batch = SpanBatch(jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(length), jnp.asarray(slot),
                          jnp.asarray(self._table(ready, rows)))
        logits, self.cache = self._decode(self.params, self.cache, batch)
        for r in ready:
            r.num_computed += 1
            self._maybe_snapshot(r)
        self._sample_and_emit(ready, logits)
        return True

    def _sample_and_emit(self, reqs: list[_Request | None], logits):
        """Sample one token for each row of logits whose request is given (None rows are skipped)."""
        rows = logits.shape[0]
        reqs = _pad(reqs, rows, None)
        col = lambda f, fill: [f(r) if r is not None else fill for r in reqs]
        sb = SamplingBatch(
            temperature=jnp.asarray(col(lambda r: r.sp.temperature, 0.0), jnp.float32),
            top_k=jnp.asarray(col(lambda r: r.sp.top_k, -1), jnp.int32),
            top_p=jnp.asarray(col(lambda r: r.sp.top_p, 1.0), jnp.float32),
            min_p=jnp.asarray(col(lambda r: r.sp.min_p, 0.0), jnp.float32),
            seed=jnp.asarray(col(_seed, 0), jnp.uint32),
            step=jnp.asarray(col(lambda r: len(r.generated), 0), jnp.int32))
        tok, lp, top_ids, top_lp = jax.device_get(sample(logits, sb))
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            if r is None:
                continue
            if r.t_last == 0.0:
                self.metrics.observe_ttft(now - r.t_arrival)
            else:
                self.metrics.observe_itl(now - r.t_last)
            r.t_last = now
            self._emit(r, int(tok[i]), float(lp[i]), top_ids[i], top_lp[i])

    def _stop_ids(self, r: _Request) -> set[int]:
        return (set() if r.sp.ignore_eos else self._eos) | set(r.sp.stop_token_ids)

    def _emit(self, r: _Request, t: int, lp: float, top_ids, top_lp):
        """Account one sampled token: stop checks, streamed text (holding back a possible stop-string start)."""
        r.generated.append(t)
        self._counters["generation_tokens"] += 1
        sp = r.sp
        stop_tok = t in self._stop_ids(r)
        r.raw += "" if stop_tok else r.decoder.feed(t)
        reason, end = None, None
        cut = _find_stop(r.raw, sp.stop, since=len(r.text))
        if stop_tok or cut is not None:
            reason = "stop"
            end = cut
        elif len(r.generated) >= sp.max_tokens or len(r.prompt_ids) + len(r.generated) >= self.max_model_len:
            reason = "length"
        if reason is not None and end is None:
            r.raw += r.decoder.flush()  # complete any held-back partial character
            end = len(r.raw)
        elif reason is None:
            end = len(r.raw) - _stop_prefix_len(r.raw, sp.stop)
        delta = r.raw[len(r.text):end]
        r.text += delta
        lps = None
        if r.logprobs is not None:
            tl = TokenLogprob(t, self.tokenizer.decode([t], skip_special_tokens=False), lp,
                              [(int(a), self.tokenizer.decode([int(a)], skip_special_tokens=False), float(b))
                               for a, b in list(zip(top_ids, top_lp))[:sp.top_logprobs]])
            r.logprobs.append(tl)
            lps = [tl]
        if delta or not stop_tok:
            r.out.put(StreamDelta(delta, [t], lps))
        if reason is not None:
            self._finish(r, reason, ok=True)

    # ---------------------------------------------------------------- finishing (step 7)
    def _finish(self, r: _Request, reason: str, ok: bool, error: str | None = None):
        if r.done.is_set():
            return
        if r in self._running:
            self._running.remove(r)
        if r.pending is not None:
            if self.cache_mode == "none" or r.key is None:
                self.ledger = L.release(self.ledger, r.pending)
            elif self.cache_mode == "align":
                self.ledger = L.commit(self.ledger, r.pending, ok, r.pending.snap_len, use_snapshot=True)
            else:
                self.ledger = L.commit(self.ledger, r.pending, ok, r.num_computed)
            r.pending = None
        if r.key is not None:
            if ok and r.raw_turn:
                self.conversations.finish(r.key, True, list(r.new_messages), list(r.prompt_ids) + r.generated)
            elif ok:
                # The committed answer is what its token ids decode to, so that rendering the committed
                # messages reproduces the committed ids (r.text may be cut at a stop string). A final stop
                # token was never fed to the model: the template's own closing of the message replaces it in
                # the next turn, exactly as a full re-render would.
                body = r.generated[:-1] if r.generated and r.generated[-1] in self._stop_ids(r) else r.generated
                answer = self.tokenizer.decode(body, skip_special_tokens=False)
                msgs = list(r.new_messages) + [{"role": "assistant", "content": answer}]
                seen = list(r.new_seen or r.new_messages) + [{"role": "assistant", "content": r.text}]
                self.conversations.finish(r.key, True, msgs, list(r.prompt_ids) + list(body), seen)
            else:
                self.conversations.finish(r.key, False)
        self._counters["requests_finished"] += 1
        self.metrics.observe_e2e(time.perf_counter() - r.t_arrival)
        r.result = ChatResult(text=r.text, token_ids=list(r.generated), prompt_tokens=len(r.prompt_ids),
                              cached_tokens=r.attached, completion_tokens=len(r.generated), finish_reason=reason,
                              logprobs=r.logprobs, error=error)
        r.admitted.set()
        r.out.put(None)
        r.done.set()


def _pad(vals, rows, fill):
    return list(vals) + [fill] * (rows - len(vals))


def _seed(r: _Request) -> int:
    if r.sp.seed is not None:
        return int(r.sp.seed) % (2 ** 32)
    return hash(r.rid) % (2 ** 32)


def _find_stop(raw: str, stops, since: int) -> int | None:
    """Where the earliest stop string starts in raw[since:] (the text not yet streamed); None if none."""
    best = None
    for st in stops:
        i = raw.find(st, since)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _stop_prefix_len(raw: str, stops) -> int:
    """Length of the longest tail of raw that could still grow into a stop string (held back from the stream)."""
    best = 0
    for st in stops:
        for k in range(min(len(st) - 1, len(raw)), best, -1):
            if raw.endswith(st[:k]):
                best = k
                break
    return best


def _conversation_key(conversation_id, cache_salt):
    if not isinstance(conversation_id, str) or not conversation_id or len(conversation_id) > _MAX_ID_LEN:
        raise BadRequest(f"conversation_id must be a non-empty string of at most {_MAX_ID_LEN} characters",
                         param="conversation_id")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt
                                   or len(cache_salt) > _MAX_ID_LEN):
        raise BadRequest(f"cache_salt must be a non-empty string of at most {_MAX_ID_LEN} characters",
                         param="cache_salt")
    return (cache_salt, conversation_id)


def _validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRequest(f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = m["role"]
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}",
                             param=f"messages[{i}].role")
        content = m.get("content", "")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise BadRequest(f"messages[{i}].content parts must be text parts", param=f"messages[{i}]")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out
