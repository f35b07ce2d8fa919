"""Whose clock times the engine's steps: the wall's, or a stand-in device's.

Benchmarks time every step with the wall clock: that is what the planner
must predict.  A test cannot rely on it.  On a shared machine the same
steps of the same workload took 10% longer in one run than in the next
(docs/benchmarks.md), so a wall-clock bound of 15% passes or fails with the
neighbours.  A :class:`StepClock` instead gives each step a duration as a
function of the step itself: a device whose speed law is known.  The engine
still runs its model and its scheduler for real; only the seconds are
stood in.  Calibration, fit and replay can then be held to the engine
deterministically, on any machine.
"""

from __future__ import annotations

from typing import Protocol

from kvpage.step_io import SchedulerOutput


class StepClock(Protocol):
    def step_seconds(self, out: SchedulerOutput) -> float:
        """How long the device took for this step (one the engine ran: it has sequences or page operations)."""
