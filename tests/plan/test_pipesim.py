"""The planner's bubble equals the idle slots of the executed pipeline schedule.

The op order is megamoe.parallel.pipeline.schedule (what PipelineExecutor runs). Here an
independent tick-by-tick executor runs it: at every tick each rank either works on its next op
(F 1 tick, B 2 ticks; 3 with full recompute) or idles because the op's input is not there yet;
its idle ticks over all ticks must equal megamoe.plan.pipesim.bubble_fraction exactly, and the
known closed forms hold: 1F1B (P-1)/(M+P-1), interleaved (P-1)/(V*M+P-1).
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from megamoe.parallel.pipeline import schedule
from megamoe.plan.pipesim import bubble_fraction, unit_run

CASES = [(2, 1, 4), (4, 1, 8), (4, 1, 3), (3, 1, 5), (8, 1, 16), (2, 2, 4), (4, 2, 8), (4, 2, 12), (2, 3, 6)]


def ticks(pp: int, vpp: int, m: int, bwd: int) -> tuple[int, int, list[int]]:
    """(idle ticks, total ticks, peak alive forwards per rank) of the schedule run tick by tick."""
    ops = [schedule(pp, vpp, m, r) for r in range(pp)]
    last = pp * vpp - 1
    finished: set = set()
    pos, left, idle = [0] * pp, [0] * pp, 0
    alive, peak = [0] * pp, [0] * pp
    now = 0
    while any(p < len(o) for p, o in zip(pos, ops)) or any(left):
        done_now = []
        for r in range(pp):
            if left[r] == 0 and pos[r] < len(ops[r]):
                op = ops[r][pos[r]]
                s = op.chunk * pp + r
                need = (("F", op.micro, s - 1) if s > 0 else None) if op.kind == "F" else \
                    (("B", op.micro, s + 1) if s < last else ("F", op.micro, s))
                if need is None or need in finished:
                    left[r] = 1 if op.kind == "F" else bwd
                    alive[r] += 1 if op.kind == "F" else -1
                    peak[r] = max(peak[r], alive[r])
            if left[r]:
                left[r] -= 1
                if left[r] == 0:
                    op = ops[r][pos[r]]
                    done_now.append((op.kind, op.micro, op.chunk * pp + r))
                    pos[r] += 1
            else:
                idle += 1
        finished.update(done_now)           # visible from the next tick on
        now += 1
    return idle, pp * now, peak


@pytest.mark.parametrize("pp,vpp,m", CASES)
@pytest.mark.parametrize("bwd", [2, 3])
def test_bubble_equals_idle_ticks(pp, vpp, m, bwd):
    idle, total, peak = ticks(pp, vpp, m, bwd)
    assert bubble_fraction(pp, vpp, m, bwd) == Fraction(idle, total)
    assert list(unit_run(pp, vpp, m, bwd).peak_in_flight) == peak


@pytest.mark.parametrize("pp,vpp,m", CASES)
def test_bubble_closed_forms(pp, vpp, m):
    assert bubble_fraction(pp, vpp, m) == Fraction(pp - 1, vpp * m + pp - 1)


def test_1f1b_in_flight_is_pp_minus_rank():
    assert unit_run(4, 1, 8).peak_in_flight == (4, 3, 2, 1)
    assert unit_run(4, 1, 2).peak_in_flight == (2, 2, 2, 1)
    assert bubble_fraction(1, 1, 8) == 0
