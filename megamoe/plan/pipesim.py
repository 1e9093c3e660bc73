"""Execute the pipeline schedule on a clock: bubble and in-flight micro-batches, from the schedule itself.

The op order of every pipeline rank is `megamoe.parallel.pipeline.schedule(pp, vpp, M, rank)`,
the generator the trainer's PipelineExecutor runs. Each rank executes its ops in that order;
an op starts when the rank is free and its input exists:
    F(m, stage s)  needs F(m, s-1) finished (stage 0: the data)
    B(m, s)        needs B(m, s+1) finished (the last stage: its own F(m, s), earlier on the rank)
Durations are given per stage (forward, backward); `p2p` is added to every cross-stage
dependency. With integer durations (F = 1 slot, B = 2 slots) the idle slots of this clock are the
bubble of the executed schedule: 1F1B gives (P-1)/(M+P-1) of every rank's time.

Peak in-flight: the most forwards a rank has run whose backward has not run yet (their
activations are alive), counted per chunk -- what the memory model multiplies by.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

from megamoe.parallel.pipeline import schedule


@dataclass(frozen=True)
class PipeRun:
    makespan: float
    busy: tuple[float, ...]          # per pipeline rank
    idle: tuple[float, ...]          # per pipeline rank: makespan - busy
    peak_in_flight: tuple[int, ...]  # per pipeline rank: most (micro, chunk) forwards alive at once

    @property
    def bubble(self) -> float:
        """Idle share of all ranks' time, sum(idle) / (pp * makespan)."""
        return sum(self.idle) / (len(self.idle) * self.makespan) if self.makespan else 0.0


def simulate(pp: int, vpp: int, num_micro: int, fwd: list, bwd: list, p2p=0) -> PipeRun:
    """fwd[s], bwd[s]: durations of stage s = chunk * pp + rank (ints or Fractions stay exact)."""
    ops = [schedule(pp, vpp, num_micro, r) for r in range(pp)]
    last = pp * vpp - 1
    done: dict[tuple[str, int, int], object] = {}     # (kind, micro, stage) -> finish time
    pos, free = [0] * pp, [0] * pp
    busy = [0] * pp
    alive, peak = [0] * pp, [0] * pp
    remaining = sum(len(o) for o in ops)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(ops[r]):
                op = ops[r][pos[r]]
                stage = op.chunk * pp + r
                if op.kind == "F":
                    dep = ("F", op.micro, stage - 1) if stage > 0 else None
                else:
                    dep = ("B", op.micro, stage + 1) if stage < last else ("F", op.micro, stage)
                if dep is not None and dep not in done:
                    break
                ready = done[dep] + (p2p if dep[2] != stage else 0) if dep is not None else 0
                start = max(free[r], ready)
                dur = fwd[stage] if op.kind == "F" else bwd[stage]
                free[r] = start + dur
                busy[r] += dur
                done[(op.kind, op.micro, stage)] = free[r]
                alive[r] += 1 if op.kind == "F" else -1
                peak[r] = max(peak[r], alive[r])
                pos[r] += 1
                remaining -= 1
                progressed = True
        assert progressed, "pipeline schedule deadlocked in the simulation"
    makespan = max(free)
    return PipeRun(makespan, tuple(busy), tuple(makespan - b for b in busy), tuple(peak))


@functools.lru_cache(maxsize=4096)
def unit_run(pp: int, vpp: int, num_micro: int, bwd_slots: int = 2) -> PipeRun:
    """The schedule in whole slots: every chunk's forward 1 slot, backward `bwd_slots` (2; 3 when
    the backward recomputes the forward), no p2p time. Exact (integer) idle slots."""
    n = pp * vpp
    return simulate(pp, vpp, num_micro, [1] * n, [bwd_slots] * n)


def bubble_fraction(pp: int, vpp: int, num_micro: int, bwd_slots: int = 2) -> Fraction:
    """Idle slots / all slots of the executed schedule (exact)."""
    if pp == 1:
        return Fraction(0)
    run = unit_run(pp, vpp, num_micro, bwd_slots)
    return Fraction(int(sum(run.idle)), int(pp * run.makespan))


__all__ = ["PipeRun", "simulate", "unit_run", "bubble_fraction"]
