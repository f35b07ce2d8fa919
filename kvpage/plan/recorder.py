"""What a replay records as it goes: request timings, and after every step waste, thrashing, a thinned series.

:class:`StepRecorder` takes each step the replay runs (:meth:`StepRecorder.step`)
or a decode run's steps at once (:meth:`StepRecorder.flush`, from the
decode fast-forward), and feeds the engine's own accumulators
(:class:`~kvpage.sched.pressure.WasteStats`, :class:`~kvpage.sched.pressure.ThrashingMonitor`)
the same values in both cases.  Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter

from kvpage.kv import KVWaste
from kvpage.plan.fast_forward import RunStep
from kvpage.sched import Scheduler, Sequence
from kvpage.sched.pressure import PressureSample, ThrashingMonitor, WasteStats, affine_waste
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

    def due_among(self, num_steps: int) -> Iterator[int]:
        """The positions among the next ``num_steps`` steps where :meth:`due` would say yes, in order.

        The caller adds a point at each before taking the next (adding sets
        when the next is due).
        """
        position = self._countdown
        while position < num_steps:
            yield position
            position += self._countdown + 1
        self._countdown = position - num_steps

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
        self.buffered: list[RunStep] = []  # a decode run's steps, recorded at once by flush()
        # Recorded steps whose pressure samples wait to be made (flush), and the preemptions and recomputed
        # tokens they all count.
        self._unsampled: list[RunStep] = []
        self._unsampled_counts = (0, 0)

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
                # Nothing reads a finished request's sequences again: dropping them breaks the request <->
                # sequence cycle, so that reference counting frees both now. Left to the cyclic collector, they
                # made it a tenth of the replay (benchmarks/plan_default.py).
                request.sequences.clear()

    def step(self, now: float, batch_size: int, waste: KVWaste) -> None:
        """A step of ``batch_size`` sequences ended at ``now``, leaving the cache as ``waste`` says."""
        self._sample()
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

    @property
    def num_steps(self) -> int:
        """Steps taken so far: recorded, and buffered by a decode run."""
        return self.waste_stats.num_samples + len(self.buffered)

    def flush(self, origin: KVWaste, deltas: tuple[tuple[int, ...], ...]) -> None:
        """:meth:`step` of each buffered step of a decode run (nothing recomputed or waiting in them), at once.

        A step's snapshot is ``origin`` plus ``deltas`` times its stored
        slots, touched pages and pages in use (:meth:`WasteStats.add_run`).
        """
        steps = self.buffered
        counters = self.counters
        _, slots, pages, held, _, _, _, batch_sizes = zip(*steps)  # RunStep's fields, each in one pass
        self.waste_stats.add_run(origin, deltas, slots, pages, held, batch_sizes)
        counts = (counters.num_preemptions, counters.num_recomputed_tokens)
        if counts != self._unsampled_counts:
            self._sample()
        monitor, unsampled = self.monitor, self._unsampled
        unsampled += steps
        self._unsampled_counts = counts
        if not monitor.quiet(counts[1]):
            self._sample()
        else:
            # No verdict can change: the steps wait, as they are, for a sample only if still in the window when
            # the monitor is next asked. In a long run most never are (the window is seconds, a step a millisecond).
            kept = monitor.kept_from(unsampled, itemgetter(0))
            if kept:  # the window starts among them: every sample before leaves it
                del unsampled[:kept]
                monitor.restart()
        for position in self.series.due_among(len(steps)):
            now, stored, touched, in_use, evictions, _, _, batch_size = steps[position]
            self._point(now, batch_size, affine_waste(origin, deltas, (stored, touched, in_use)), evictions, 0)
        steps.clear()

    def _sample(self) -> None:
        """Give the monitor the samples of the steps that wait for one (:meth:`flush`)."""
        steps = self._unsampled
        if steps:
            preempted, recomputed = self._unsampled_counts
            new = tuple.__new__  # PressureSample's own __new__ is a Python function: this is a third of the cost
            self.monitor.extend([new(PressureSample, (now, evictions, preempted, recomputed, computed, generated))
                                 for now, _, _, _, evictions, computed, generated, _ in steps])
            steps.clear()

    def _point(self, now: float, batch_size: int, waste: KVWaste, evictions: int, queue_length: int) -> None:
        fractions = waste.fractions()
        self.series.add(time_s=now, batch_size=batch_size, kv_usage=waste.pages_in_use / self.num_pages,
                        queue_length=queue_length, preemptions=self.counters.num_preemptions,
                        evictions=evictions, reservation_waste=fractions["reservation_waste"],
                        internal_fragmentation=fractions["internal_fragmentation"],
                        external_fragmentation=fractions["external_fragmentation"])
