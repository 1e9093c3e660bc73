"""Fault handling: a hung-step watchdog, rank-agreement checks, readable collective timeouts.

StepWatchdog      a daemon thread; if one training step (with its eval / checkpoint) runs longer
                  than `timeout_s`, it prints the step number and the stack traces of all threads
                  (faulthandler), then optionally ends the process so a scheduler sees a failure
                  instead of a job idling until its time limit.
check_ranks_agree all-gathers short fingerprints (config, dataset) at startup and fails with one
                  line naming the ranks that differ: a rank with another config or other data
                  would otherwise train silently wrong or hang in a mismatched collective.
named_collective  turns a collective's timeout error into one that names the process group and
                  the configured limit (parallel.timeout_s), instead of a bare backend error.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import sys
import threading
import time

import numpy as np

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


# ------------------------------------------------------------------------- rank agreement checks

def fingerprint(obj) -> str:
    """Short stable hash of a JSON-able object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_fingerprint(cfg) -> dict[str, str]:
    """{"model.d_model": "128", ...}: every field, so a mismatch can name the fields that differ."""
    from megamoe.config import to_dict

    def flatten(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", json.dumps(value)
    return dict(flatten(to_dict(cfg)))


def dataset_fingerprint(dataset, probes: int = 4) -> str:
    """Length + the tokens of a few samples spread over the dataset. Cheap (reads `probes`
    samples) and catches another corpus, split, seed, sequence length or shuffle."""
    if dataset is None:
        return "none"
    n = len(dataset)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({int(i) for i in np.linspace(0, max(n - 1, 0), num=min(probes, n))}) if n else []:
        h.update(np.ascontiguousarray(np.asarray(dataset[i], dtype=np.int64)).tobytes())
    return h.hexdigest()[:12]


def _field_diff(a: dict, b: dict, limit: int = 3) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}={b.get(k, 'missing')} vs {a.get(k, 'missing')}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def disagreement(values: list[dict]) -> str | None:
    """One line naming what differs between ranks, or None. values[r] = {what: fingerprint}, a
    fingerprint being a hash string or a dict of fields (then the differing fields are named)."""
    problems = []
    for what in values[0]:
        groups: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            groups.setdefault(fingerprint(v.get(what, "missing")), []).append(rank)
        if len(groups) == 1:
            continue
        # Name the minority: ranks that differ from what most ranks (ties: rank 0) have.
        ref_hash, ref_ranks = max(groups.items(), key=lambda kv: (len(kv[1]), 0 in kv[1]))
        odd = sorted(r for h, ranks in groups.items() if h != ref_hash for r in ranks)
        ref_value, odd_value = values[ref_ranks[0]].get(what), values[odd[0]].get(what)
        if isinstance(ref_value, dict) and isinstance(odd_value, dict):
            detail = _field_diff(ref_value, odd_value)
        else:
            detail = f"{odd_value} vs {ref_value}"
        problems.append(f"{what} differs on rank{'s' if len(odd) > 1 else ''} {','.join(map(str, odd))} "
                        f"({detail} on rank {ref_ranks[0]})")
    return "; ".join(problems) if problems else None


def check_ranks_agree(fingerprints: dict, group=None, timeout_s: float | None = None) -> None:
    """All-gather `fingerprints` ({"config": ..., "train data": ...}) over `group` (default: the
    world) and raise ValueError with one line if any rank differs. No-op without distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    from megamoe.parallel.launch import group_label
    with named_collective(group_label(group), timeout_s):
        dist.all_gather_object(gathered, fingerprints, group=group)
    problem = disagreement(gathered)
    if problem:
        raise ValueError(f"ranks disagree at startup: {problem}; launch every rank with the same "
                         f"config, overrides and data")


def max_over_ranks(value: int, device=None) -> int:
    """The largest `value` over all ranks (the value itself without distributed)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# --------------------------------------------------------------------------- collective timeouts

class CollectiveTimeout(RuntimeError):
    """A collective or rendezvous did not complete within parallel.timeout_s."""


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text or type(err).__name__ in ("DistStoreError",)


def collective_timeout(group_name: str, timeout_s: float | None, err: BaseException) -> "CollectiveTimeout":
    """The CollectiveTimeout to raise (from `err`) for a timed-out collective on `group_name`."""
    limit = f" after {timeout_s:g} s (parallel.timeout_s)" if timeout_s else ""
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return CollectiveTimeout(
        f"collective on process group {group_name} timed out{limit}: some rank of that group "
        f"is stuck or died (check the other ranks' logs; raise parallel.timeout_s for slow "
        f"steps). Backend said: {first_line}")


def is_collective_timeout(err: BaseException) -> bool:
    return not isinstance(err, CollectiveTimeout) and _is_timeout(err)


@contextlib.contextmanager
def named_collective(group_name: str, timeout_s: float | None = None):
    """Re-raise a timeout inside the body as CollectiveTimeout naming `group_name`:

        with named_collective("'ep' (ranks 0,1)", cfg.parallel.timeout_s):
            dist.all_to_all_single(...)
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - backends raise RuntimeError / DistBackendError / ...
        if not is_collective_timeout(err):
            raise
        raise collective_timeout(group_name if group_name.startswith("'") else repr(group_name),
                                 timeout_s, err) from err
