"""What a replay records as it goes: request timings, and after every step waste, thrashing, a thinned series.

:class:`StepRecorder` takes each step the replay runs (:meth:`StepRecorder.step`)
or a run of quiet steps at once (:meth:`StepRecorder.quiet_steps`, from the
decode fast-forward), and feeds the engine's own accumulators
(:class:`~kvpage.sched.pressure.WasteStats`, :class:`~kvpage.sched.pressure.ThrashingMonitor`)
the same values in both cases.  Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvpage.kv import KVWaste
from kvpage.plan.fast_forward import QuietStep
from kvpage.sched import Scheduler, Sequence
from kvpage.sched.pressure import PressureSample, ThrashingMonitor, WasteStats
from kvpage.workloads import Workload

MAX_SERIES_POINTS = 2000


@dataclass
class RequestTiming:
    arrival: float
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0


class Series:
    """Per-step samples over time, thinned as they come so that at most MAX_SERIES_POINTS are kept."""

    def __init__(self) -> None:
        self.points: dict[str, list[float]] = {}
        self.stride = 1
        self._countdown = 0

    def due(self) -> bool:
        self._countdown -= 1
        return self._countdown < 0

    def add(self, **values: float) -> None:
        self._countdown = self.stride - 1
        for key, value in values.items():
            self.points.setdefault(key, []).append(float(value))
        if len(self.points["time_s"]) >= MAX_SERIES_POINTS:  # keep every other point, sample half as often
            self.points = {key: column[::2] for key, column in self.points.items()}
            self.stride *= 2


class StepRecorder:
    """What the replay records as it goes: request timings, and after every step waste, thrashing, the series."""

    def __init__(self, sched: Scheduler, workload: Workload, num_pages: int) -> None:
        self.sched = sched
        # What every step reads, held here rather than through the scheduler's properties (once a step).
        self.kv, self.counters, self.waiting = sched.kv, sched.counters, sched.waiting
        self.requests = workload.requests
        self.num_pages = num_pages
        self.timings = [RequestTiming(r.arrival_time) for r in self.requests]
        self.waste_stats = WasteStats()
        self.monitor = ThrashingMonitor(warn=False)
        self.onset: float | None = None
        self.max_fraction = 0.0
        self.series = Series()

    def tokens(self, seqs: Iterable[Sequence], now: float) -> None:
        """These sequences got a token at ``now`` (request ids are trace indices)."""
        for seq in seqs:
            request = seq.request
            timing = self.timings[int(request.request_id)]
            if timing.first_token is None:
                timing.first_token = now
            if request.is_finished:
                timing.finished = now
                timing.output_tokens = self.requests[int(request.request_id)].output_tokens

    def step(self, now: float, batch_size: int, waste: KVWaste) -> None:
        """A step of ``batch_size`` sequences ended at ``now``, leaving the cache as ``waste`` says."""
        counters, monitor = self.counters, self.monitor
        evictions = self.kv.num_evictions
        self.waste_stats.add(waste, batch_size, bool(self.waiting))
        monitor.add(PressureSample(now, evictions, counters.num_preemptions, counters.num_recomputed_tokens,
                                   counters.num_tokens_computed, counters.num_generated_tokens))
        if monitor.is_thrashing:
            self.max_fraction = max(self.max_fraction, monitor.rates()["recompute_fraction"])
            if self.onset is None:
                self.onset = now
        if self.series.due():
            self._point(now, batch_size, waste, evictions, len(self.waiting))

    def quiet_steps(self, steps: list[QuietStep], batch_size: int, first: KVWaste, per_token: tuple[int, ...],
                    per_page: tuple[int, ...]) -> None:
        """:meth:`step` of each of a run's quiet steps (no request waiting, nothing recomputed), recorded at once.

        Their snapshots are affine: ``first`` (the first step's) plus
        ``per_token`` a slot stored beyond it and ``per_page`` a page
        touched beyond it (:meth:`WasteStats.add_run`).
        """
        counters = self.counters
        self.waste_stats.add_run(first, per_token, per_page, [step[1] for step in steps],
                                 [step[2] for step in steps], batch_size)
        preempted, recomputed = counters.num_preemptions, counters.num_recomputed_tokens
        generated_minus_computed = counters.num_generated_tokens - counters.num_tokens_computed
        new = tuple.__new__  # PressureSample's own __new__ is a Python function: this is a third of the cost
        self.monitor.extend([new(PressureSample, (now, evictions, preempted, recomputed, computed,
                                                  computed + generated_minus_computed))
                             for now, _, _, evictions, computed in steps])
        stored0, touched0 = steps[0][1], steps[0][2]
        for now, stored, touched, evictions, _ in steps:
            if self.series.due():
                tokens, pages = stored - stored0, touched - touched0
                waste = KVWaste(*(f + tokens * t + pages * p for f, t, p in zip(first, per_token, per_page)))
                self._point(now, batch_size, waste, evictions, 0)

    def _point(self, now: float, batch_size: int, waste: KVWaste, evictions: int, queue_length: int) -> None:
        fractions = waste.fractions()
        self.series.add(time_s=now, batch_size=batch_size, kv_usage=waste.pages_in_use / self.num_pages,
                        queue_length=queue_length, preemptions=self.counters.num_preemptions,
                        evictions=evictions, reservation_waste=fractions["reservation_waste"],
                        internal_fragmentation=fractions["internal_fragmentation"],
                        external_fragmentation=fractions["external_fragmentation"])
