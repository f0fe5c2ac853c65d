"""The progress of a batch run: a bar with the generation rate while it runs (`Progress`), the summary printed
at the end (`format_summary`)."""
from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.generated = 0
        self._last = 0.0
        self.bar = None
        if enabled and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, desc="batch")

    def tokens(self, n: int):
        with self.lock:
            self.generated += n
            now = time.perf_counter()
            if self.bar is not None and now - self._last > 0.25:
                self._last = now
                self.bar.set_postfix_str(f"{self.generated / max(now - self.t0, 1e-9):.1f} gen tok/s",
                                         refresh=True)

    def request_done(self):
        with self.lock:
            if self.bar is not None:
                now = time.perf_counter()
                self.bar.set_postfix_str(f"{self.generated / max(now - self.t0, 1e-9):.1f} gen tok/s",
                                         refresh=False)
                self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def format_summary(s: dict) -> str:
    ran = s["requests"] - s["skipped"]
    lines = [f"requests: {s['requests']} in the input, {s['skipped']} already done, {ran} run "
             f"({s['succeeded']} ok, {s['errors']} errors)"
             + (" -- interrupted; run again to resume" if s.get("interrupted") else ""),
             f"tokens: prompt {s['prompt_tokens']} (cached {s['cached_tokens']}), generated {s['completion_tokens']}",
             f"wall time: {s['wall_s']:.2f} s; {s['generated_tokens_per_s']:.1f} generated tok/s, "
             f"{s['tokens_per_s']:.1f} computed tok/s (uncached prompt + generated)"]
    return "\n".join(lines)
