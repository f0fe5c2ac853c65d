"""The model runner: shape buckets, warm-up, batch building (numpy, two arrays a step) and step dispatch.

Steps are dispatched without waiting: `decode` returns the device-side `Sampled` of its step, and the engine
builds and dispatches the next decode step (whose input tokens it takes from that `Sampled` on the device)
before it reads this one's tokens. Every shape a step can take is a bucket listed by `shapes()`; its program is
compiled once (serving/step_programs.py): `warmup` compiles them all before serving, or (first_only) those a first
short request needs, and `compile_rest_in_background` the rest while serving, smallest buckets first.
"""
from __future__ import annotations

import itertools
import time

import jax
import numpy as np

from hybrid_jax.fused import FLOAT_FIELDS, INT_FIELDS, NUM_STOP, make_serving_steps, neutral_adjust, pack_rows
from hybrid_jax.sharding import replicated_sharding
from serving.adjust import AdjustBuilder
from serving.step_programs import LOG_EVERY_S, StepPrograms

PREFILL_TOKENS_MIN = 16
FIRST_PROMPT_TOKENS = 64  # a first short request (a chat turn of a few sentences) prefills in chunks up to this


def pow_bucket(n: int, lo: int, cap: int, factor: int) -> int:
    """The smallest lo * factor**k >= n, capped at cap (always >= lo)."""
    b = lo
    while b < n and b < cap:
        b *= factor
    return min(b, cap) if cap >= lo else lo


def _ladder(lo: int, cap: int, factor: int) -> list[int]:
    out, b = [], lo
    while b < cap:
        out.append(b)
        b *= factor
    return out + [max(cap, lo)]


class ModelRunner:
    def __init__(self, cfg, params, caches, *, max_num_seqs: int, max_prefill_tokens: int, max_prefill_rows: int,
                 table_width: int, adjust: AdjustBuilder):
        self.cfg, self.params, self.caches = cfg, params, caches
        self.block_size = caches.block_size
        self.max_rows = pow_bucket(max_num_seqs, 2, 1 << 30, 2)
        self.max_prefill_tokens = pow_bucket(max_prefill_tokens, PREFILL_TOKENS_MIN, 1 << 30, 4)
        self.prefill_rows = max(1, min(max_prefill_rows, max_num_seqs))
        self.table_width = table_width
        self._prefill, self._decode = make_serving_steps(cfg, self.max_rows)
        # where a decode step's own sampled tokens live (replicated over the mesh with tensor parallelism)
        self._replicated = replicated_sharding(cfg)
        self._no_prev = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
        self.adjust = adjust
        self._neutral: dict[int, tuple] = {}  # rows -> device-resident neutral (masks, bias)
        # programs are lowered from these abstract shapes, never from the arrays (a running step donates the cache)
        self._abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                      (params, caches.cache))
        self.programs = StepPrograms(lambda shape: self.lowered(*shape), self.shapes())

    def _adjust(self, rows: int, reqs, steps) -> tuple:
        """The step's (masks, bias): built on the host when a row changes its logits, else the neutral ones that
        stay on the device."""
        if rows not in self._neutral:
            self._neutral[rows] = tuple(jax.device_put(a, self._replicated)
                                        for a in neutral_adjust(rows, self.cfg.vocab_size))
        built = self.adjust.build(rows, reqs, steps) if reqs else None
        if built is None:
            return self._neutral[rows]
        # placed as the neutral ones are, so the step's program is the same
        masks, bias = (None if a is None else jax.device_put(a, self._replicated) for a in built)
        return masks, self._neutral[rows][1] if bias is None else bias

    # ------------------------------------------------------------------ buckets
    def decode_rows(self, n: int) -> int:
        return pow_bucket(n, 2, self.max_rows, 4)

    def prefill_rows_for(self, n: int) -> int:
        return 1 if n == 1 else self.prefill_rows

    def tokens(self, n: int) -> int:
        return pow_bucket(n, PREFILL_TOKENS_MIN, self.max_prefill_tokens, 4)

    def width(self, n_blocks: int) -> int:
        """Block-table width: the batch's longest table, bucketed, so attention reads what the history needs."""
        return pow_bucket(n_blocks, 4, self.table_width, 4)

    def _ladders(self) -> dict[str, tuple[list[int], list[int], list[int]]]:
        """kind -> the (rows, tokens, widths) buckets its steps take."""
        widths = _ladder(4, self.table_width, 4)
        return {"decode": (_ladder(2, self.max_rows, 4), [1], widths),
                "prefill": (sorted({1, self.prefill_rows}), _ladder(PREFILL_TOKENS_MIN, self.max_prefill_tokens, 4),
                            widths)}

    def shapes(self) -> list[tuple]:
        """Every (kind, rows, tokens, width) a step can take."""
        return [(kind, *shape) for kind, ladders in self._ladders().items() for shape in itertools.product(*ladders)]

    def first_shapes(self) -> list[tuple]:
        """The shapes a first short request needs: one row, the narrowest block table, prompt chunks of up to
        FIRST_PROMPT_TOKENS tokens; then its decode steps."""
        (_, tokens, widths), dec_rows = self._ladders()["prefill"], self._ladders()["decode"][0]
        pre = [("prefill", 1, t, widths[0]) for t in tokens if t <= max(FIRST_PROMPT_TOKENS, tokens[0])]
        return pre + [("decode", dec_rows[0], 1, widths[0])]

    def by_likelihood(self) -> list[tuple]:
        """Every shape, smallest buckets first (the sum of the rows, tokens and width bucket ranks): the order in
        which a load that grows from one short request meets them."""
        ladders = self._ladders()

        def rank(shape):
            kind, *sizes = shape
            ranks = [ladder.index(v) for ladder, v in zip(ladders[kind], sizes)]
            return sum(ranks), ranks[2], kind != "decode", ranks
        return sorted(self.shapes(), key=rank)

    # ------------------------------------------------------------------ batches
    def _pack(self, rows, reqs, T: int, width: int, spans, srcs, stops):
        """Two arrays for a step of `rows` rows: ints (tokens, stop ids, fields, table) and floats."""
        tokens = np.zeros((rows, T), np.int32)
        stop = np.full((rows, NUM_STOP), -1, np.int32)
        fields = np.zeros((rows, len(INT_FIELDS)), np.int64)
        fields[:, INT_FIELDS.index("src")] = -1
        table = np.zeros((rows, width), np.int32)
        floats = np.zeros((rows, len(FLOAT_FIELDS)), np.float32)
        floats[:, [FLOAT_FIELDS.index("top_p"), FLOAT_FIELDS.index("repetition")]] = 1.0  # off
        for i, r in enumerate(reqs):
            s, e = spans[i]
            tokens[i, :e - s] = r.tokens(s, e) if T > 1 or srcs[i] < 0 else 0
            ids = stops[i][:NUM_STOP]
            stop[i, :len(ids)] = ids
            sp = r.sp
            fields[i] = (s, e - s, r.pending.slot, sp.top_k, _seed(r), len(r.generated) + r.inflight, srcs[i])
            floats[i] = (sp.temperature, sp.top_p, sp.min_p, sp.repetition_penalty)
            n = min(len(r.pending.blocks), width)
            table[i, :n] = r.pending.blocks[:n]
        adjust = self._adjust(rows, reqs, [len(r.generated) + r.inflight for r in reqs])
        return pack_rows(tokens, stop, fields, table), floats, adjust

    def prefill(self, reqs, spans):
        """Dispatch one chunked-prefill step: reqs[i] computes its tokens spans[i] = (start, end)."""
        rows = self.prefill_rows_for(len(reqs))
        T = self.tokens(max(e - s for s, e in spans))
        # attention reads positions < end only: the table needs no block past the chunk (the request holds
        # blocks for its whole prompt, so early chunks of a long prompt stay cheap)
        width = self.width(max(-(-e // self.block_size) for _, e in spans))
        ints, floats, (masks, bias) = self._pack(rows, reqs, T, width, spans, [-1] * len(reqs), [()] * len(reqs))
        program = self.programs.get(("prefill", rows, T, width))
        out, self.caches.cache = program(self.params, self.caches.cache, ints, floats, masks, bias)
        return out

    def decode(self, reqs, srcs, stops, prev=None):
        """Dispatch one decode step. srcs[i] >= 0: the row's input token is prev.token[srcs[i]] (on the device),
        else its last generated token; stops[i]: ids that, coming from prev, are not fed."""
        rows = self.decode_rows(len(reqs))
        width = self.width(max(len(r.pending.blocks) for r in reqs))
        spans = [(r.num_computed, r.num_computed + 1) for r in reqs]
        ints, floats, (masks, bias) = self._pack(rows, reqs, 1, width, spans, srcs, stops)
        for i, r in enumerate(reqs):
            if srcs[i] < 0:
                ints[i, 0] = r.generated[-1]
        prev_tok = prev.token if prev is not None else self._no_prev
        program = self.programs.get(("decode", rows, 1, width))
        out, self.caches.cache = program(self.params, self.caches.cache, ints, floats, masks, bias, prev_tok)
        return out

    # ------------------------------------------------------------------ warm-up
    def warmup(self, progress: bool = True, log_every: float = LOG_EVERY_S, first_only: bool = False) -> dict:
        """Compile every step program, or (first_only) those of `first_shapes()`, leaving the rest to
        `compile_rest_in_background`. progress: a bar on the terminal; the log says how far it got every
        `log_every` seconds in any case. Returns {"programs": compiled now, "background": left, "seconds"}."""
        t0 = time.perf_counter()
        now = self.first_shapes() if first_only else self.by_likelihood()
        bar = _progress(len(now), progress)
        self.programs.compile(now, log_every, progress=bar)
        bar.close()
        return {"programs": len(now), "background": len(self.shapes()) - self.programs.ready(),
                "seconds": time.perf_counter() - t0}

    def compile_rest_in_background(self, log_every: float = LOG_EVERY_S) -> None:
        """Compile the programs not ready yet in a background thread while serving, smallest buckets first."""
        self.programs.compile_in_background(self.by_likelihood(), log_every)

    def _scratch(self, rows: int, T: int, width: int):
        """(ints, floats, masks, bias) of a step on scratch rows (slot 0, block 0, length 0): what warm-up runs."""
        ints = np.zeros((rows, T + NUM_STOP + len(INT_FIELDS) + width), np.int32)
        ints[:, T + NUM_STOP + INT_FIELDS.index("src")] = -1
        floats = np.zeros((rows, len(FLOAT_FIELDS)), np.float32)
        masks, bias = self._adjust(rows, [], [])
        return ints, floats, masks, bias

    def lowered(self, kind: str, rows: int, T: int, width: int):
        """The step program of one of `shapes()`, lowered (jax's Lowered: as_text, compile), not run: from the
        abstract parameters and cache, so it may run in any thread beside the steps."""
        ints, floats, masks, bias = self._scratch(rows, T, width)
        params, cache = self._abstract
        if kind == "decode":
            return self._decode.lower(params, cache, ints, floats, masks, bias, self._no_prev)
        return self._prefill.lower(params, cache, ints, floats, masks, bias, T=T)


def _seed(r) -> int:
    if r.sp.seed is not None:
        return int(r.sp.seed) % (2 ** 32)
    return hash(r.rid) % (2 ** 32)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="compiling step programs", unit="program", disable=not enabled, leave=False)
