"""The step order, written once: schedule, commit, launch, wait, resolve (pure Python).

:class:`StepLoop` runs the scheduler against an :class:`Executor`, which
runs a scheduled step somewhere: on the model (the engine's executor wraps
the :class:`~kvpage.worker.ModelRunner`) or in virtual time (the planner's
advances a clock by a cost model's step time).  Both the engine and the
planner call the same :meth:`StepLoop.step`, so they see the same
schedule.

The **synchronous** order completes every step before the next is
scheduled::

    schedule N; commit N; launch N; wait N; resolve N

The **asynchronous** order (``overlap=True``, the engine's default on a
GPU) schedules and launches step N while step N-1 still runs, so host work
hides behind device work::

    schedule N; commit N; launch N      # N-1 still running
    wait N-1; resolve N-1

Two rules keep it exact.  A step whose sampling reads the host's view of
the output (penalties, ``min_tokens``, beam search: see
:meth:`~kvpage.step_io.SchedulerOutput.can_overlap`) is waited for before
the next is scheduled.  A step that runs no sequence has nothing to
overlap with: it completes at once, so that when the last requests end
the loop holds nothing in flight and goes idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from kvpage.metrics import StepTimings
from kvpage.sched.scheduler import Scheduler
from kvpage.sched.sequence import Sequence
from kvpage.step_io import SampledToken, SchedulerOutput

Handle = TypeVar("Handle")
Result = TypeVar("Result")


class Executor(Protocol[Handle]):
    """Runs scheduled steps: the engine's model runner, or the planner's virtual device."""

    def launch(self, out: SchedulerOutput, previous: Handle | None) -> Handle:
        """Start a committed step; ``previous`` is the step still in flight, whose tokens it may read."""

    def wait(self, handle: Handle) -> list[SampledToken]:
        """The sampled tokens of a launched step, once it is done (one per sampling sequence, in order)."""


@dataclass
class InFlight(Generic[Handle]):
    """A launched step whose tokens are not resolved yet."""

    out: SchedulerOutput
    handle: Handle
    # Whether the next step may be scheduled before this one's tokens are resolved.
    overlappable: bool


class StepLoop(Generic[Handle, Result]):
    """One scheduler, one executor, and the step in flight.

    ``on_resolved(out, touched)`` runs after each step's tokens are
    resolved (``touched``: the sequences that got one) and returns what
    :meth:`step` reports for it: the engine builds its outputs there, the
    planner records its figures.
    """

    def __init__(self, scheduler: Scheduler, executor: Executor[Handle], overlap: bool,
                 on_resolved: Callable[[SchedulerOutput, list[Sequence]], list[Result]],
                 timings: StepTimings | None = None) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.overlap = overlap
        self.on_resolved = on_resolved
        self.timings = timings if timings is not None else StepTimings()
        self.in_flight: InFlight[Handle] | None = None
        # False after a call that scheduled nothing and completed nothing: only an arrival can help.
        self.made_progress = True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def step(self) -> list[Result]:
        """Run one step; returns what ``on_resolved`` made of the steps this call completed.

        With ``overlap`` these are the step launched by the previous call,
        and the one launched now is still running.
        """
        in_flight = self.in_flight
        if in_flight is not None and not in_flight.overlappable:
            self.in_flight = None
            self.made_progress = True
            return self._complete(in_flight)
        start = time.perf_counter()
        out = self.scheduler.schedule()
        self.scheduler.commit_step(out)
        self.timings.schedule_s += time.perf_counter() - start
        try:
            handle = self.executor.launch(out, in_flight.handle if in_flight is not None else None)
        except BaseException:
            self.in_flight = None  # the caller fails or aborts these requests
            raise
        launched = InFlight(out, handle, self.overlap and out.can_overlap())
        self.made_progress = in_flight is not None or not out.is_empty
        if not self.overlap:
            return self._complete(launched)
        earlier = self._complete(in_flight) if in_flight is not None else []
        if not out.sequences:  # nothing runs on the device: nothing to overlap with
            self.in_flight = None  # else a finished step would stay "in flight" and the loop never idle
            return earlier + self._complete(launched)
        self.in_flight = launched
        return earlier

    def drain(self) -> list[Result]:
        """Wait for the step in flight, if any, and resolve it."""
        in_flight, self.in_flight = self.in_flight, None
        return self._complete(in_flight) if in_flight is not None else []

    def _complete(self, step: InFlight[Handle]) -> list[Result]:
        try:
            sampled = self.executor.wait(step.handle)
        except BaseException:
            self.in_flight = None
            raise
        start = time.perf_counter()
        touched = self.scheduler.resolve_step(step.out, sampled)
        timings = self.timings
        timings.update_s += time.perf_counter() - start
        timings.num_steps += 1
        return self.on_resolved(step.out, touched)
