"""A request's data: its sampling parameters, its state inside the engine, and what it hands back."""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from typing import Any

from hybrid_jax import ledger as L
from hybrid_jax.sampling import NUM_TOP_LOGPROBS
from serving.errors import BadRequest
from serving.tokenizer import IncrementalDecoder


INT32_MAX = 2 ** 31 - 1  # every integer the device steps take is int32
MAX_N = 16               # choices of one request


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a sampling parameter may take: [lo, hi], or (lo, hi] when `lo_open`."""
    lo: float
    hi: float
    lo_open: bool = False

    def __contains__(self, v) -> bool:
        return (self.lo < v if self.lo_open else self.lo <= v) and v <= self.hi

    def __str__(self) -> str:
        def num(x):
            return f"{x:g}" if isinstance(x, float) else str(x)
        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}]"

    def bounds(self) -> dict:
        """The bounds as pydantic's Field arguments (the request models of serving.openai)."""
        return {"gt" if self.lo_open else "ge": self.lo, "le": self.hi}


# The one home of the value ranges: SamplingParams.create checks them, the request models of serving.openai
# declare them (docs/server.md, "Limits").
RANGES = {
    "max_tokens": Range(1, INT32_MAX),
    "temperature": Range(0.0, 2.0),
    "top_p": Range(0.0, 1.0, lo_open=True),
    "top_k": Range(1, INT32_MAX),            # or -1: off
    "min_p": Range(0.0, 1.0),
    "top_logprobs": Range(0, NUM_TOP_LOGPROBS),
    "token_id": Range(0, INT32_MAX),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repetition_penalty": Range(0.0, 2.0, lo_open=True),
    "logit_bias": Range(-100.0, 100.0),
    "min_tokens": Range(0, INT32_MAX),       # and at most max_tokens
}


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0             # vLLM's: > 1 discourages tokens of the prompt and output
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    min_tokens: int = 0                         # stop tokens are barred before this many tokens
    grammar: Any = None                         # serving.grammar.GrammarSpec the output must follow

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
        kw["logit_bias"] = _logit_bias(kw.get("logit_bias") or ())
        p = cls(**kw)
        r = RANGES
        checks = [(isinstance(p.max_tokens, int) and p.max_tokens in r["max_tokens"],
                   f"max_tokens must be an integer in {r['max_tokens']}"),
                  (p.temperature in r["temperature"], f"temperature must be in {r['temperature']}"),
                  (p.top_p in r["top_p"], f"top_p must be in {r['top_p']}"),
                  (p.top_k == -1 or p.top_k in r["top_k"], f"top_k must be -1 (off) or in {r['top_k']}"),
                  (p.min_p in r["min_p"], f"min_p must be in {r['min_p']}"),
                  (p.top_logprobs in r["top_logprobs"], f"top_logprobs must be in {r['top_logprobs']}"),
                  (all(t in r["token_id"] for t in p.stop_token_ids),
                   f"stop_token_ids must be token ids in {r['token_id']}"),
                  (p.presence_penalty in r["presence_penalty"],
                   f"presence_penalty must be in {r['presence_penalty']}"),
                  (p.frequency_penalty in r["frequency_penalty"],
                   f"frequency_penalty must be in {r['frequency_penalty']}"),
                  (p.repetition_penalty in r["repetition_penalty"],
                   f"repetition_penalty must be in {r['repetition_penalty']}"),
                  (all(t in r["token_id"] and b in r["logit_bias"] for t, b in p.logit_bias),
                   f"logit_bias maps token ids to biases in {r['logit_bias']}"),
                  (isinstance(p.min_tokens, int) and p.min_tokens in r["min_tokens"] and p.min_tokens <= p.max_tokens,
                   "min_tokens must be an integer in [0, max_tokens]")]
        for ok, msg in checks:
            if not ok:
                raise BadRequest(msg, param=msg.split()[0])
        return p


GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(source: str | None, model_dir: str | None) -> dict:
    """Sampling defaults of requests that leave a field out, as vLLM's --generation-config: "auto" reads the
    checkpoint's generation_config.json, "vllm" (or None) uses the engine's own defaults, a directory reads the
    generation_config.json in it. Only temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens
    are taken."""
    if source in (None, "vllm"):
        return {}
    path = os.path.join(model_dir if source == "auto" else source, "generation_config.json")
    if not os.path.isfile(path):
        if source != "auto":
            raise FileNotFoundError(f"--generation-config {source}: no generation_config.json there")
        return {}
    with open(path) as f:
        cfg = json.load(f)
    out = {ours: cfg[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if cfg.get(theirs) is not None}
    SamplingParams.create(**out)  # a checkpoint's bad default fails at start, not on every request
    return out


def _logit_bias(v) -> tuple[tuple[int, float], ...]:
    """{token id (int or its decimal string): bias} or (id, bias) pairs -> sorted (id, bias) pairs."""
    items = v.items() if isinstance(v, dict) else v
    try:
        return tuple(sorted((int(k), float(b)) for k, b in items))
    except (TypeError, ValueError):
        raise BadRequest("logit_bias must map token ids to numbers", param="logit_bias") from None


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


@dataclasses.dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    sp: SamplingParams
    key: tuple | None = None                 # (cache_salt, conversation_id)
    salt: str | None = None                  # the checkpoint namespace
    boundaries: tuple[int, ...] = ()         # message boundaries inside the prompt where a checkpoint is taken
    new_messages: list[dict] | None = None   # committed messages of this turn on success
    new_seen: list[dict] | None = None       # the same, as the client saw them
    raw_turn: bool = False                   # a raw completion turn: commits no assistant message
    two_phase: bool = False                  # commit only when the caller settles it as delivered
    pending: L.Pending | None = None
    attached: int = 0
    num_computed: int = 0                     # tokens fed to the device (dispatched steps included)
    inflight: int = 0                         # decode steps dispatched whose token was not read yet
    preemptions: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    text: str = ""                            # streamed so far
    raw: str = ""                             # decoded so far (may run past a stop string)
    logprobs: list[TokenLogprob] | None = None
    decoder: IncrementalDecoder | None = None
    matcher: Any = None                       # the grammar's matcher (serving.grammar), when sp.grammar is set
    prompt_bits: Any = None                   # the prompt's token bitmask (repetition penalty), built once
    leader: "Request | None" = None           # n > 1: a sibling waits until its leader checkpointed the prompt
    group_slots: int = 0                      # n > 1, on the leader: state slots its n choices need at once
    seen_answer: dict | None = None           # the answer as the client received it (settle), if it differs
    aborted: bool = False
    t_arrival: float = dataclasses.field(default_factory=time.perf_counter)
    t_last: float = 0.0
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    admitted: threading.Event = dataclasses.field(default_factory=threading.Event)
    settled: threading.Event = dataclasses.field(default_factory=threading.Event)  # committed or released
    committed: bool = False                   # what the settle did (a conversation turn: written to its ledger)
    result: ChatResult | None = None

    @property
    def fed_target(self) -> int:
        """Tokens that must be in the state before the next decode step: the prompt and every generated token
        but the last (the next decode step feeds that one)."""
        return len(self.prompt_ids) + max(len(self.generated) - 1, 0)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.fed_target

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + generated (a preempted request recomputes its generated tokens)."""
        n = len(self.prompt_ids)
        return (self.prompt_ids[start:end] if end <= n
                else self.prompt_ids[start:] + self.generated[max(start - n, 0):end - n])


