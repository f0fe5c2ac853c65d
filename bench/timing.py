"""Timing helper shared by the benchmarks."""
from __future__ import annotations

import statistics
import time


def median_seconds(fn, reps: int, warm: int = 1) -> float:
    """Median seconds of fn() (which must block) over reps runs, after `warm` untimed runs."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
