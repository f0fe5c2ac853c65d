"""Prometheus metrics of the OpenAI server (`GET /metrics`).

Every app gets its own `CollectorRegistry`, so several apps (several engines) in one process never clash.

* Latency histograms (`Metrics.observe_ttft / observe_itl / observe_e2e`): the engine calls them when it is
  constructed with `metrics=` (or when the app attaches them to it); otherwise the app observes them itself.
* Everything else is read from `engine.stats()` at scrape time by `EngineStatsCollector`: gauges for running
  and waiting requests and for the KV block and Mamba slot pools, and counters for prompt, cached prompt and
  generation tokens and for conversation cache hits, misses and evictions.
* HTTP-level counters (requests by endpoint and finish reason, errors by status) are incremented by the app.

All names start with `hybrid_serve_`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["PREFIX", "Metrics", "EngineStatsCollector", "CONTENT_TYPE_LATEST"]

log = logging.getLogger("serving.metrics")

PREFIX = "hybrid_serve_"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)

# (stats key, metric name, help). Gauges: instantaneous values.
_GAUGES = (
    ("running", "num_requests_running", "Requests currently running (prefill or decode)."),
    ("waiting", "num_requests_waiting", "Requests waiting to be admitted."),
    ("kv_blocks_used", "kv_blocks_used", "KV cache blocks in use (in-flight and committed conversations)."),
    ("kv_blocks_total", "kv_blocks_total", "KV cache blocks in the pool."),
    ("slots_used", "mamba_slots_used", "Mamba state slots in use (in-flight and committed conversations)."),
    ("slots_total", "mamba_slots_total", "Mamba state slots in the pool."),
    ("checkpoints", "checkpoints", "Committed checkpoints (exact states at token positions) in the device cache."),
    ("host_checkpoints", "host_checkpoints", "Evicted checkpoints waiting in host memory."),
    ("heads", "conversation_heads", "Named conversations whose head checkpoint is cached."),
    ("cache_bytes", "cache_bytes", "Device bytes of the cache (KV blocks and Mamba state slots)."),
    ("host_cache_bytes", "host_cache_bytes", "Bytes of conversation state held in host memory."),
    ("disk_checkpoints", "disk_checkpoints", "Checkpoints stored in the disk tier (--disk-cache-memory)."),
    ("disk_bytes", "disk_cache_bytes", "Bytes of conversation state stored in the disk tier."),
    ("step_programs_compiled", "step_programs_compiled", "Step programs compiled (the rest compile in the "
     "background after start, or when first used)."),
    ("step_programs_total", "step_programs_total", "Step programs the engine can run (one per shape bucket)."),
)
# Counters: monotonic totals kept by the engine (exposed with the `_total` suffix).
_COUNTERS = (
    ("prompt_tokens", "prompt_tokens", "Prompt tokens of admitted requests (cached ones included)."),
    ("cached_prompt_tokens", "cached_prompt_tokens", "Prompt tokens served from the conversation cache."),
    ("generation_tokens", "generation_tokens", "Generated tokens."),
    ("hits", "cache_hits", "Requests that attached a committed checkpoint."),
    ("misses", "cache_misses", "Requests that found no checkpoint to attach (any cause)."),
    ("miss_no_checkpoint", "cache_misses_no_checkpoint", "Misses: nothing committed under the request's salt."),
    ("miss_evicted", "cache_misses_evicted", "Misses: the conversation's head checkpoint was evicted for good."),
    ("miss_not_prefix", "cache_misses_not_prefix", "Misses: no checkpoint's tokens begin the request's prompt."),
    ("evictions", "checkpoint_evictions", "Checkpoints evicted from the device cache to make room."),
    ("offloads", "checkpoint_offloads", "Evicted checkpoints moved to host memory."),
    ("host_restores", "checkpoint_host_restores", "Checkpoints brought back from host memory."),
    ("disk_hits", "disk_hits", "Checkpoints read back from the disk tier."),
    ("disk_writes", "disk_writes", "States written to the disk tier (spilled or written behind at commit)."),
    ("disk_write_drops", "disk_write_drops", "Disk writes dropped: the bounded write queue was full, or a write "
     "failed."),
    ("disk_rejects", "disk_rejects", "Files in the disk tier that did not check out (torn, foreign, another "
     "model setup): deleted, never loaded."),
    ("preemptions", "preemptions", "Running requests preempted (state released, recomputed later) for room."),
    ("requests_finished", "requests_finished", "Requests finished by the engine (any reason)."),
)


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class EngineStatsCollector(Collector):
    """Reads `stats()` at scrape time and exposes the pool gauges and the engine's counters."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def describe(self) -> Iterable:
        return []  # do not call stats() at registration time

    def collect(self) -> Iterable:
        try:
            s = dict(self._stats() or {})
        except Exception:  # a scrape must never fail because of the engine
            log.exception("engine.stats() failed")
            s = {}
        for key, name, doc in _GAUGES:
            v = _num(s.get(key))
            if v is not None:
                g = GaugeMetricFamily(PREFIX + name, doc)
                g.add_metric([], v)
                yield g
        for used, total, name, doc in (
                ("kv_blocks_used", "kv_blocks_total", "kv_cache_usage_ratio", "Fraction of KV blocks in use."),
                ("slots_used", "slots_total", "mamba_slot_usage_ratio", "Fraction of Mamba state slots in use.")):
            u, t = _num(s.get(used)), _num(s.get(total))
            if u is not None and t:
                g = GaugeMetricFamily(PREFIX + name, doc)
                g.add_metric([], u / t)
                yield g
        for key, name, doc in _COUNTERS:
            v = _num(s.get(key))
            if v is not None:
                c = CounterMetricFamily(PREFIX + name, doc)
                c.add_metric([], v)
                yield c


class Metrics:
    """One registry with the server's metrics. Pass it to the engine as `metrics=` (it implements the engine's
    `observe_ttft / observe_itl / observe_e2e` hooks) and to `create_app`."""

    def __init__(self, engine: Any = None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token (arrival to first "
                              "sampled token).", buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive generated tokens "
                             "of a request.", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.http_requests = Counter(PREFIX + "http_requests", "Generation requests answered by the server, by "
                                     "endpoint and finish reason.", ["endpoint", "finish_reason"], registry=r)
        self.http_errors = Counter(PREFIX + "http_errors", "Error responses, by HTTP status.", ["status"],
                                   registry=r)
        self._engine_collector: EngineStatsCollector | None = None
        if engine is not None:
            self.bind_engine(engine)

    def bind_engine(self, engine: Any) -> None:
        if self._engine_collector is not None or not hasattr(engine, "stats"):
            return
        self._engine_collector = EngineStatsCollector(engine.stats)
        self.registry.register(self._engine_collector)

    # The engine's hooks (called from its loop thread; prometheus_client is thread-safe).
    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(max(float(seconds), 0.0))

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(max(float(seconds), 0.0))

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.observe(max(float(seconds), 0.0))

    # Server-side counters.
    def count_request(self, endpoint: str, finish_reason: str) -> None:
        self.http_requests.labels(endpoint=endpoint, finish_reason=finish_reason or "unknown").inc()

    def count_error(self, status: int) -> None:
        self.http_errors.labels(status=str(int(status))).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
