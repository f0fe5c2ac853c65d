"""The compiled step programs, one per shape bucket, each compiled once: before serving, by a background thread
while serving, or by the first step that needs it, whichever comes first (the others wait for that compile).

A program is lowered from the abstract shapes of the parameters and the cache (never from the arrays, which a
running step may have donated), so compiling touches no state and runs beside the engine's steps. The engine
thread calls `get(shape)`: a ready program at once; one the background thread is compiling, when it is done; any
other, compiled there and then. Nothing compiles twice, and nothing compiles after `all_ready()`.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable

log = logging.getLogger("serving.runner")
LOG_EVERY_S = 5.0  # how often a warm-up says in the log how far it got (whatever stdout is: a file, a pipe)


class StepPrograms:
    def __init__(self, lower: Callable[[tuple], object], shapes: list[tuple]):
        """lower(shape) -> jax Lowered of the step program of `shape`; shapes: every shape a step can take."""
        self._lower, self.shapes = lower, list(shapes)
        self._ready: dict[tuple, object] = {}
        self._compiling: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.compiled_by: dict[tuple, str] = {}  # shape -> who compiled it ("warm-up", "background warm-up", "step")
        self.compiles = 0                        # compiles run (each shape's once)
        self.steps_waited = 0                    # steps that waited for a compile (theirs, or the background's)

    def get(self, shape: tuple):
        """The compiled program of `shape` (jax Compiled: called with the jitted function's non-static arguments),
        compiling it now, or waiting for the compile under way, if it is not ready."""
        program = self._ready.get(shape)
        return program if program is not None else self._compile(shape, by="step")

    def ready(self) -> int:
        return len(self._ready)

    def all_ready(self) -> bool:
        return len(self._ready) == len(self.shapes)

    def _compile(self, shape: tuple, by: str):
        """The program of `shape`: compiled here (by `by`) unless ready or under way elsewhere (then waited for)."""
        t0 = time.perf_counter()
        with self._lock:
            if shape in self._ready:
                return self._ready[shape]
            future, mine = self._compiling.get(shape), False
            if future is None:
                future, mine = self._compiling.setdefault(shape, Future()), True
                self.compiles += 1
            if by == "step":
                self.steps_waited += 1
        if not mine:
            program = future.result()
        else:
            try:
                program = self._lower(shape).compile()
            except BaseException as e:
                with self._lock:
                    self._compiling.pop(shape, None)
                future.set_exception(e)
                raise
            with self._lock:
                self._ready[shape] = program
                self.compiled_by[shape] = by
                self._compiling.pop(shape, None)
            future.set_result(program)
        if by == "step":
            log.info("a step waited %.1fs for step program %s (%s)", time.perf_counter() - t0, _name(shape),
                     "compiled for it" if mine else "compiled by the background warm-up")
        return program

    def compile(self, shapes: list[tuple], log_every: float = LOG_EVERY_S, progress=None, what: str = "warm-up"):
        """Compile `shapes` here, in order; the log says how far it got every `log_every` seconds, and
        progress.update(1) (a terminal bar) follows each one."""
        t0 = last = time.perf_counter()
        for done, shape in enumerate(shapes, 1):
            if self._stop.is_set():
                return
            self._compile(shape, by=what)
            if progress is not None:
                progress.update(1)
            now = time.perf_counter()
            if now - last >= log_every and done < len(shapes):
                log.info("%s: %d/%d step programs compiled (%.0fs)", what, done, len(shapes), now - t0)
                last = now
        log.info("%s: %d step programs ready in %.1fs", what, len(shapes), time.perf_counter() - t0)

    def compile_in_background(self, shapes: list[tuple], log_every: float = LOG_EVERY_S) -> None:
        """Compile `shapes` (those not ready yet, in order) in a daemon thread while the engine serves."""
        rest = [s for s in shapes if s not in self._ready]
        if not rest:
            return

        def run():
            try:
                self.compile(rest, log_every, what="background warm-up")
            except Exception:  # noqa: BLE001 (a program that fails here fails again, and is reported, where used)
                log.exception("background warm-up stopped; the remaining programs compile when first used")

        self._thread = threading.Thread(target=run, name="step-program-warmup", daemon=True)
        self._thread.start()

    def wait_background(self, timeout: float | None = None) -> bool:
        """Wait for the background compiles to end; whether every program is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.all_ready()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background compiles after the one under way (waits up to `timeout` seconds for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _name(shape: tuple) -> str:
    kind, rows, tokens, width = shape
    return f"{kind}(rows={rows}, tokens={tokens}, table={width})"
