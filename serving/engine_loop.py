"""The engine's loop thread (steps 5 to 7 of docs/design.md): draining calls and requests from the inbox,
admitting, dispatching decode and prefill steps, reading their tokens, finishing requests (commit, release, or
hold until a two-phase caller settles) and recovering from a failed step.

`EngineLoop` is the half of `serving.engine.Engine` that runs on the loop thread; `Engine.__init__` sets the state
it works on (scheduler, runner, caches, output processor, conversations, counters, inbox). The public,
thread-safe calls stay in engine.py.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from serving.request import ChatResult, Request
from serving.scheduler import NeedSync
from serving.turns import validate_messages

log = logging.getLogger("serving.engine")
SWEEP_EVERY_S = 5.0  # how often idle conversations are swept
TOMBSTONE_TTL_S = 30 * 86400.0  # how long a forgotten conversation's id answers conversation_expired
PURGE_EVERY_S = 3600.0


class EngineLoop:
    """The loop-thread methods of Engine (see the module docstring)."""

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
            if isinstance(item, Request):
                self.scheduler.waiting.append(item)
            elif isinstance(item, tuple) and item[0] == "settle":
                self._settle_held(item[1], item[2], item[3])
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
                s = self.scheduler
                self._drain(block=not (s.waiting or s.running or self._inflight))
                self._step()
            except Exception as e:  # never let one bad step kill the engine
                try:
                    self._recover(e)
                except Exception:  # nor its recovery: the loop goes on, /health keeps telling the truth
                    log.exception("recovery from a failed step failed")
        self._collect()
        for req in self.scheduler.waiting + self.scheduler.running:
            self._finish(req, "abort", ok=False)
        for req in list(self._held):
            self._settle_held(req, False)

    def _recover(self, e: Exception):
        """A step failed: fail the requests of that step only (those it was building or running); requests of
        other steps go on. If the failure took the donated cache with it, start over with an empty cache and
        requeue every other running request: it recomputes its tokens, and its output does not change. The
        checkpoints in the host and disk tiers stay; committed conversations whose state was on the device
        recompute their next turn from their token ids."""
        log.exception("engine step failed")
        culprits, self._step_rows = list(self._step_rows or self.scheduler.running), []
        lost = self._cache_lost()
        for req in culprits:
            self._finish(req, "error", ok=False, error=f"{type(e).__name__}: {e}")
        if self._inflight is not None:  # the previous decode step's tokens are lost with it: recompute them
            lost_rows, self._inflight = list(self._inflight[1]), None
            for r in lost_rows:
                if not r.done.is_set() and r in self.scheduler.running:
                    self.scheduler.preempt(r, release=not lost)
        if lost:
            log.error("the device cache was lost in the failed step; continuing with an empty cache")
            for r in list(self.scheduler.running):
                self.scheduler.preempt(r, release=False)
            self.caches.reset()

    def _cache_lost(self) -> bool:
        """Whether the device cache went with a failed step: donated to it (deleted), or its output of a step
        whose fault surfaces when it is read (poisoned)."""
        leaves = jax.tree_util.tree_leaves(self.caches.cache)
        if any(x.is_deleted() for x in leaves):
            return True
        try:
            jax.block_until_ready(leaves)
        except Exception:  # noqa: BLE001 (whatever the device raised, the buffers are unusable)
            return True
        return False

    def alive(self) -> bool:
        """Whether the loop thread runs (the server's /health answers 503 otherwise)."""
        return self._thread.is_alive() and not self._stop

    def _sweep(self):
        """Every few seconds: forget idle conversations past their time-to-live or beyond the table's bound,
        with every checkpoint they committed, and anonymous checkpoints unused for as long."""
        now = time.time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(SWEEP_EVERY_S, (self.conversation_ttl or SWEEP_EVERY_S) / 2)
        for key, reason in self.conversations.idle_to_forget(self.conversation_ttl, self.max_conversations, now):
            if self.conversations.forget(key, reason):
                self.caches.drop_conversation(key)
                self._counters["conversations_expired"] += 1
        if self.conversation_ttl:
            self.caches.expire(now - self.conversation_ttl)
        if now >= self._next_purge:  # the ids of conversations forgotten long ago are free again
            self._next_purge = now + PURGE_EVERY_S
            self.conversations.purge_tombstones(now - TOMBSTONE_TTL_S)

    def _step(self):
        s = self.scheduler
        self._sweep()
        if self._held:
            self._expire_held()
        self._reap_aborted()
        s.admit(lambda req, msg: self._finish(req, "error", ok=False, error=msg))
        self._decode()
        self._prefill()

    def _decode(self):
        """Dispatch the next decode step, then read the previous one (whose tokens feed this one on device)."""
        prev = self._inflight
        try:
            rows = self.scheduler.decode_rows(prev[1] if prev else {})
        except NeedSync:
            self._collect()  # a preemption needs every token on the host first
            prev, rows = None, self.scheduler.decode_rows({})
        new = None
        if rows:
            reqs = [r for r, _ in rows]
            srcs = [src for _, src in rows]
            stops = [self.scheduler.stop_list(r) if src >= 0 else [] for r, src in rows]
            self._step_rows = reqs
            out = self.runner.decode(reqs, srcs, stops, prev[0] if prev else None)
            self._step_rows = []
            for r in reqs:
                r.num_computed += 1
                r.inflight += 1
            new = (out, {r: i for i, r in enumerate(reqs)})
        self._inflight = new
        if prev:
            self._read_step(prev, ahead=new[1] if new else {})
        if self.cache_mode == "align":
            for r in (new[1] if new else {}):
                self._maybe_snapshot(r)

    def _collect(self):
        if self._inflight:
            prev, self._inflight = self._inflight, None
            self._read_step(prev, ahead={})

    def _read_step(self, step, ahead: dict):
        """`_read`, with the step's rows as the culprits should it fail: a device fault surfaces when a step's
        results are read, one step after its dispatch (`_recover`)."""
        self._step_rows = list(step[1])
        self._read(step, ahead)
        self._step_rows = []

    def _read(self, step, ahead: dict):
        """Emit the tokens of a dispatched decode step. A row also in the step `ahead` (dispatched since) had
        this token fed on the device, unless it is a stop token (masked there: not fed)."""
        out, rows = step
        tok, lp, top_ids, top_lp = jax.device_get((out.token, out.logprob, out.top_ids, out.top_lp))
        for r, i in rows.items():
            if r.done.is_set() or r.pending is None:
                continue
            r.inflight -= 1
            t = int(tok[i])
            if r in ahead and t in self.output.stop_ids(r):
                r.num_computed -= 1
            self._emit(r, t, float(lp[i]), top_ids[i], top_lp[i])

    def _prefill(self):
        chunks = self.scheduler.prefill_rows(decoding=len(self._inflight[1]) if self._inflight else 0)
        if not chunks:
            return
        reqs = [r for r, _, _ in chunks]
        self._step_rows = reqs
        out = self.runner.prefill(reqs, [(s, e) for _, s, e in chunks])
        first = []
        for i, (r, s, e) in enumerate(chunks):
            r.num_computed = e
            self._maybe_snapshot(r)
            if e in r.boundaries and self.cache_mode == "exact":
                self.caches.fork(r.pending, r.salt, np.asarray(r.tokens(0, e), np.int32), r.key)
            if e == r.fed_target and not r.generated:
                first.append(i)
        if first:
            tok, lp, top_ids, top_lp = jax.device_get((out.token, out.logprob, out.top_ids, out.top_lp))
            for i in first:
                self._emit(reqs[i], int(tok[i]), float(lp[i]), top_ids[i], top_lp[i])
        self._step_rows = []

    def _maybe_snapshot(self, r: Request):
        if self.cache_mode == "align" and r.num_computed % self.block_size == 0 and r.num_computed > 0:
            r.pending = self.caches.snapshot(r.pending, r.num_computed)

    def _emit(self, r: Request, t: int, lp: float, top_ids, top_lp):
        now = time.perf_counter()
        if r.t_last == 0.0:
            self.metrics.observe_ttft(now - r.t_arrival)
        else:
            self.metrics.observe_itl(now - r.t_last)
        r.t_last = now
        self._counters["generation_tokens"] += 1
        try:
            if r.matcher is not None:
                r.matcher.accept(t)
            reason = self.output.emit(r, t, lp, top_ids, top_lp)
        except Exception as e:  # one request's output failed (detokenization, ...): that request alone fails
            log.exception("request %s: output processing failed", r.rid)
            self._finish(r, "error", ok=False, error=f"{type(e).__name__}: {e}")
            return
        if reason is not None:
            self._finish(r, reason, ok=True)

    def _reap_aborted(self):
        s = self.scheduler
        for req in [r for r in s.waiting if r.aborted]:
            s.waiting.remove(req)
            self._finish(req, "abort", ok=False)
        for req in [r for r in s.running if r.aborted]:
            self._finish(req, "abort", ok=False)

    # ---------------------------------------------------------------- finishing (step 7)
    def _finish(self, r: Request, reason: str, ok: bool, error: str | None = None):
        """End a request: its result is final. Its state is committed (ok) or released now, or, for a two-phase
        request that finished well, held until the caller settles it (or the delivery timeout passes)."""
        if r.done.is_set():
            return
        s = self.scheduler
        if r in s.running:
            s.running.remove(r)
        if r in s.waiting:
            s.waiting.remove(r)
        if ok and r.two_phase and not r.aborted:
            self._held[r] = time.monotonic() + self.delivery_timeout
            if r.key is not None:
                self.conversations.hold(r.key)
        else:
            self._settle(r, ok)
        self._counters["requests_finished"] += 1
        self.metrics.observe_e2e(time.perf_counter() - r.t_arrival)
        r.result = ChatResult(text=r.text, token_ids=list(r.generated), prompt_tokens=len(r.prompt_ids),
                              cached_tokens=r.attached, completion_tokens=len(r.generated), finish_reason=reason,
                              logprobs=r.logprobs, error=error)
        r.admitted.set()
        r.out.put(None)
        r.done.set()

    def _settle_held(self, r: Request, delivered: bool, seen: dict | None = None):
        if seen is not None:
            r.seen_answer = validate_messages([seen])[0]
        if self._held.pop(r, None) is not None:
            self._settle(r, delivered)
        elif not r.done.is_set() and not delivered:
            r.aborted = True  # settled as undelivered before it finished: abort it

    def _expire_held(self):
        now = time.monotonic()
        for r in [r for r, deadline in self._held.items() if deadline < now]:
            log.warning("request %s: answer not confirmed delivered in %.0fs; its turn is discarded", r.rid,
                        self.delivery_timeout)
            self._settle_held(r, False)

    def _settle(self, r: Request, ok: bool):
        """Step 7: commit the turn's state and conversation (ok) or release them; then `r.settled` is set, with
        `r.committed` saying whether the turn was committed."""
        try:
            if r.pending is not None:
                n = r.pending.snap_len if self.cache_mode == "align" else r.num_computed
                self.caches.commit(r.pending, ok, r.salt, np.asarray(r.tokens(0, n), np.int32), r.key)
                r.pending = None
            r.committed = self._finish_conversation(r, ok) if r.key is not None else ok
        finally:
            r.settled.set()

    def _finish_conversation(self, r: Request, ok: bool) -> bool:
        if ok and r.raw_turn:
            return self.conversations.finish(r.key, True, list(r.new_messages), list(r.prompt_ids) + r.generated)
        elif ok:
            # The committed answer is what its token ids decode to, so that rendering the committed messages
            # reproduces the committed ids (r.text may be cut at a stop string).
            body = self.output.committed_body(r)
            answer = self.tokenizer.decode(body, skip_special_tokens=False)
            msgs = list(r.new_messages) + [{"role": "assistant", "content": answer}]
            seen = list(r.new_seen or r.new_messages) + [r.seen_answer or {"role": "assistant", "content": r.text}]
            return self.conversations.finish(r.key, True, msgs, list(r.prompt_ids) + list(body), seen)
        return self.conversations.finish(r.key, False)
