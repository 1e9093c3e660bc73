"""The hung-step watchdog: a daemon thread; if one training step (with its eval / checkpoint)
runs longer than `timeout_s`, it prints the step number and the stack traces of all threads
(faulthandler), then optionally ends the process so a scheduler sees a failure instead of a job
idling until its time limit. (Rank agreement checks: megamoe.parallel.agree; readable collective
timeouts: megamoe.parallel.guard.)
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time

# Exit code of a process ended by the watchdog (distinct from Python's 1 and signal codes).
WATCHDOG_EXIT_CODE = 3


class StepWatchdog:
    """Usage:  wd = StepWatchdog(600); wd.start(); ... with wd.step(n): train_step() ...; wd.stop()

    The thread wakes every `poll_s` and reports a step at most once. `abort` ends the process with
    WATCHDOG_EXIT_CODE after the report (os._exit: a hung collective cannot be unwound).
    """

    def __init__(self, timeout_s: float, abort: bool = False, rank: int = 0, file=None,
                 poll_s: float | None = None):
        self.timeout_s, self.abort, self.rank = float(timeout_s), abort, rank
        self.file = file  # needs a real file descriptor (faulthandler); default sys.stderr
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(0.05, self.timeout_s / 10))
        self._lock = threading.Lock()
        self._step: int | None = None
        self._started_at = 0.0
        self._reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reports = 0  # how many hangs were reported (for tests and logs)

    def start(self) -> "StepWatchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="megamoe-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @contextlib.contextmanager
    def step(self, step: int):
        """Watch the body as step `step` (the number the logs show)."""
        with self._lock:
            self._step, self._started_at, self._reported = step, time.monotonic(), False
        try:
            yield
        finally:
            with self._lock:
                self._step = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                step, started, reported = self._step, self._started_at, self._reported
            if step is None or reported:
                continue
            elapsed = time.monotonic() - started
            if elapsed > self.timeout_s:
                with self._lock:
                    self._reported = True
                self._report(step, elapsed)

    def _report(self, step: int, elapsed: float) -> None:
        out = self.file if self.file is not None else sys.stderr
        self.reports += 1
        action = "aborting" if self.abort else "still waiting (set watchdog_abort to end the run)"
        out.write(f"megamoe watchdog: rank {self.rank}: step {step} has run for {elapsed:.0f} s, "
                  f"longer than watchdog_s={self.timeout_s:g}; {action}. Stack traces of all threads:\n")
        out.flush()
        try:
            faulthandler.dump_traceback(file=out, all_threads=True)
        except (ValueError, OSError, AttributeError):  # e.g. a stream without a file descriptor
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        out.flush()
        if self.abort:
            os._exit(WATCHDOG_EXIT_CODE)


__all__ = ["StepWatchdog", "WATCHDOG_EXIT_CODE"]
