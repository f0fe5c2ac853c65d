"""The scheduler: admission (steps 3 and 4), the rows of each step, growth of running requests and preemption.

Requests wait in arrival order and run up to max_num_seqs at once. A running request whose next token finds no
free KV block (after least recently used committed turns were evicted) preempts the youngest running request:
its state is released and it goes back to the head of the queue with the tokens it generated so far, which it
recomputes when it is admitted again. No request ends early for lack of cache.
"""
from __future__ import annotations

import numpy as np

from hybrid_jax import ledger as L
from hybrid_jax.fused import NUM_STOP
from serving.adjust import needs_last_token
from serving.cache_manager import OutOfCache
from serving.request import Request


MIN_CHUNK = 16


def _leader_ready(r: Request) -> bool:
    """Whether r may be admitted: not a sibling, or its leader's prompt state (all but the last token) exists."""
    lead = r.leader
    return lead is None or lead.done.is_set() or lead.num_computed >= len(lead.prompt_ids) - 1


class NeedSync(Exception):
    """A decode step cannot be planned ahead of the previous step's tokens (preemption needs them)."""


class Scheduler:
    def __init__(self, caches, output, *, max_num_seqs: int, max_prefill_tokens: int, max_prefill_rows: int,
                 max_num_batched_tokens: int, block_size: int, ahead: bool, counters: dict):
        self.caches, self.output = caches, output
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.max_prefill_rows, self.block_size = max_prefill_rows, block_size
        self.ahead, self.counters = ahead, counters
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    # ------------------------------------------------------------------ admission
    def group_slots(self, n: int, prompt_len: int) -> int:
        """State slots a request of n choices holds at once: each choice's own, plus (n > 1, exact mode) the
        checkpoint of the shared prompt that the choices attach. A finished choice keeps its slot until the whole
        answer was delivered, so all n count together."""
        fork = 1 if n > 1 and self.caches.mode == "exact" and prompt_len > 1 else 0
        return n * self.caches.slots_per_request + fork

    def _reserved(self) -> int:
        """Slots promised to the waiting choices of admitted n > 1 requests (and their shared prompt state):
        other requests are admitted only into what is left, so an admitted request always completes."""
        per, leaders, total = self.caches.slots_per_request, set(), 0
        for r in self.waiting:
            if r.leader is not None and r.leader.admitted.is_set():
                total += per
                leaders.add(r.leader)
        return total + (len(leaders) if self.caches.mode == "exact" else 0)

    def _fits(self, req: Request, reserved: int) -> bool:
        """Whether req's state slots are available now without touching slots reserved for others."""
        avail = self.caches.available_slots()
        if req.leader is not None:
            return avail >= reserved  # its own share is part of the reservation
        per = self.caches.slots_per_request
        return avail - reserved >= (max(req.group_slots, per) if req.preemptions == 0 else per)

    def admit(self, fail) -> None:
        """Attach waiting requests in order while there is room; fail(req, msg) ends one that can never fit. A
        request of n choices is admitted when all n fit at once (their slots are then reserved for them), so a
        pool is never split between half-admitted requests. A sibling of an n > 1 request waits (others pass
        it) until its leader has checkpointed the prompt. A request that does not fit yet waits, and so do the
        requests behind it (first come, first served), except the siblings of requests already admitted."""
        i, blocked = 0, False
        reserved = self._reserved()
        while i < len(self.waiting) and len(self.running) < self.max_num_seqs:
            req = self.waiting[i]
            if not _leader_ready(req) or (blocked and req.leader is None):
                i += 1
                continue
            if not self._fits(req, reserved):
                blocked = True
                i += 1
                continue
            try:
                # A new request feeds its prompt; a preempted one also the generated tokens (the last by decode).
                feed = req.fed_target + (1 if req.generated else 0)
                pending = self.caches.attach(req.salt, np.asarray(req.tokens(0, feed), np.int32), req.key,
                                             count=req.preemptions == 0)
            except OutOfCache as e:
                if self.running or self.caches.owned_slots():
                    blocked = True  # wait for running and finished requests to free their state
                    i += 1
                    continue
                self.waiting.pop(i)
                fail(req, f"the cache pool is too small for this request: {e}")
                continue
            self.waiting.pop(i)
            req.pending, req.num_computed = pending, pending.attached
            if req.preemptions == 0:
                req.attached = pending.attached
                self.counters["prompt_tokens"] += len(req.prompt_ids)
                self.counters["cached_prompt_tokens"] += pending.attached
            req.admitted.set()
            self.running.append(req)
            reserved = self._reserved()

    # ------------------------------------------------------------------ decode rows
    def stop_list(self, r: Request) -> list[int]:
        return sorted(self.output.stop_ids(r))

    def can_run_ahead(self, r: Request) -> bool:
        """Whether r's next token may be fed from the device before the host has read it."""
        return self.ahead and len(self.stop_list(r)) <= NUM_STOP and not needs_last_token(r)

    def decode_rows(self, prev_rows: dict) -> list[tuple[Request, int]]:
        """(request, src) for the next decode step; src indexes the previous step's rows (prev_rows: request ->
        row) when the request's input token is still on the device, else -1. Reserves each row's next block;
        raises NeedSync when a preemption is needed while a step is in flight."""
        rows = []
        for r in list(self.running):
            if r not in self.running or r.in_prefill or not r.generated or r.done.is_set():
                continue
            if r.inflight and not (r in prev_rows and self.can_run_ahead(r)):
                continue
            if self.output.at_length(r, len(r.generated) + r.inflight):
                continue
            if not self._grow(r, r.num_computed + 1, sync_first=bool(prev_rows)):
                continue  # r itself was preempted
            rows.append((r, prev_rows[r] if r.inflight else -1))
        return [(r, s) for r, s in rows if r in self.running]

    def _grow(self, r: Request, total: int, sync_first: bool) -> bool:
        while True:
            try:
                r.pending = self.caches.reserve(r.pending, total)
                return True
            except L.OutOfBlocks:
                if sync_first:
                    raise NeedSync()
                victim = max(self.running, key=lambda x: x.t_arrival)
                self.preempt(victim)
                if victim is r:
                    return False

    def preempt(self, r: Request, release: bool = True) -> None:
        """Free r's state and requeue it first; it recomputes prompt + generated tokens when readmitted.
        release=False: the cache it held is gone already (reset after a failed step)."""
        self.running.remove(r)
        if release:
            self.caches.release(r.pending)
        r.pending, r.num_computed, r.inflight = None, 0, 0
        r.preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.insert(0, r)

    # ------------------------------------------------------------------ prefill rows
    def prefill_rows(self, decoding: int = 0) -> list[tuple[Request, int, int]]:
        """(request, start, end) chunks for one prefill step. While `decoding` rows run, the chunks share a
        budget of max_num_batched_tokens tokens with them, so a long prompt cannot stall the streams; at least
        one small chunk always runs, so prompts progress."""
        budget = self.max_num_batched_tokens - decoding if decoding else None
        out = []
        for r in self.running:
            if len(out) == self.max_prefill_rows or (budget is not None and budget <= 0 and out):
                break
            if r.in_prefill:
                s = r.num_computed
                cap = self.max_prefill_tokens if budget is None else max(min(self.max_prefill_tokens, budget),
                                                                         MIN_CHUNK)
                e = self._chunk_end(s, min(r.fed_target, s + cap), r.boundaries)
                out.append((r, s, e))
                if budget is not None:
                    budget -= e - s
        return out

    def _chunk_end(self, start: int, end: int, boundaries=()) -> int:
        if self.caches.mode == "exact":
            for b in boundaries:
                if start < b < end:
                    return b  # a checkpoint is taken there
        if self.caches.mode == "align":
            # Block-aligned engines keep hybrid state only at block boundaries: stop each chunk at one.
            boundary = (end // self.block_size) * self.block_size
            if boundary > start:
                end = boundary
        return end
