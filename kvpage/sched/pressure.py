"""Memory-pressure signals: waste by kind over a run, and thrashing rates over a window (pure Python).

:class:`WasteStats` accumulates one :class:`~kvpage.kv.KVWaste` snapshot per
engine step into step-averaged fractions, and remembers the largest batch.

:class:`ThrashingMonitor` keeps the cumulative counters of the last
``window_s`` seconds and turns them into rates: cached-page evictions and
preemptions per second, the fraction of computed tokens that were
recomputation, raw throughput (every token the model ran) and goodput
(newly generated tokens; never recomputed work).  When the recomputed
fraction passes ``recompute_threshold`` it logs one warning saying what to
do, and ``is_thrashing`` stays true (a metric) until it falls back below.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from kvpage.kv import KVWaste
from kvpage.kv.waste import KINDS

logger = logging.getLogger("kvpage.engine")
T = TypeVar("T")


def affine_waste(origin: KVWaste, deltas: tuple[tuple[int, ...], ...], point: tuple[int, int, int]) -> KVWaste:
    """``origin`` plus each delta times its coordinate (stored slots, touched pages, pages in use), field by field."""
    stored, touched, in_use = point
    per_slot, per_touched, per_in_use = deltas
    return KVWaste(*(o + stored * s + touched * t + in_use * u
                     for o, s, t, u in zip(origin, per_slot, per_touched, per_in_use)))


@dataclass
class WasteStats:
    """Step averages of :class:`~kvpage.kv.KVWaste` snapshots of one cache.

    The slots of each kind are summed as integers and divided once, in
    :meth:`means`: the same means as summing each step's fractions, cheaper
    every step, and exact whatever order the steps are added in.
    """

    num_samples: int = 0
    total_slots: int = 0  # the cache's size, the same in every snapshot
    # Slot sums over the samples, by kind, in KINDS order (free is what the other four leave).
    slot_sums: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    unshared_pages_sum: int = 0  # pages_without_sharing, summed (what a layout shadow needs: kvpage.plan.shadow)
    sharing_saving_sum: float = 0.0
    # Waste as a share of the memory that is not free (held or unusable), over steps where any is.
    waste_of_used_sum: float = 0.0
    num_used_samples: int = 0
    batch_size_sum: int = 0
    max_batch_size: int = 0
    # Steps with requests waiting: the memory-bound regime, where the layout decides the batch.
    loaded_batch_size_sum: int = 0
    num_loaded_samples: int = 0
    _last: KVWaste | None = field(default=None, repr=False)
    _last_run: tuple[KVWaste, tuple[tuple[int, ...], ...], tuple[int, int, int]] | None = field(default=None,
                                                                                                 repr=False)

    def add(self, waste: KVWaste, batch_size: int, requests_waiting: bool = False) -> None:
        total, stored, internal, reserved, external, in_use, without_sharing = waste
        if total != self.total_slots:
            if self.num_samples:
                raise ValueError(f"a snapshot of {total} slots among snapshots of {self.total_slots}")
            self.total_slots = total
        self.num_samples += 1
        if requests_waiting:
            self.loaded_batch_size_sum += batch_size
            self.num_loaded_samples += 1
        sums = self.slot_sums
        sums[0] += stored
        sums[1] += internal
        sums[2] += reserved
        sums[3] += external
        self.unshared_pages_sum += without_sharing
        if without_sharing:
            self.sharing_saving_sum += waste.sharing_saving
        not_free = internal + reserved + external + stored
        if not_free:
            self.waste_of_used_sum += (not_free - stored) / not_free
            self.num_used_samples += 1
        self.batch_size_sum += batch_size
        if batch_size > self.max_batch_size:
            self.max_batch_size = batch_size
        self._last, self._last_run = waste, None

    def add_run(self, origin: KVWaste, deltas: tuple[tuple[int, ...], ...], stored: Sequence[int],
                touched: Sequence[int], in_use: Sequence[int], batch_sizes: Sequence[int]) -> None:
        """:meth:`add` of steps whose snapshots are affine in their stored slots, touched pages and pages in use.

        Step ``i``'s snapshot is ``origin`` (the snapshot of none) plus, field
        by field, ``deltas[0]`` times ``stored[i]``, ``deltas[1]`` times
        ``touched[i]`` and ``deltas[2]`` times ``in_use[i]``
        (:meth:`~kvpage.kv.KVManager.waste_given` is affine so); no request
        waits in any of them.  The planner's decode fast-forward records its
        runs this way.  The same sums as :meth:`add` step by step: integers
        summed in closed form, the two ratios added in step order.
        """
        n = len(stored)
        if not n:
            return
        total = origin.total_slots
        if total != self.total_slots:
            if self.num_samples:
                raise ValueError(f"a snapshot of {total} slots among snapshots of {self.total_slots}")
            self.total_slots = total
        per_slot, per_touched, per_in_use = deltas
        sum_stored, sum_touched, sum_in_use = sum(stored), sum(touched), sum(in_use)

        def total_of(field: int) -> int:
            return (n * origin[field] + sum_stored * per_slot[field] + sum_touched * per_touched[field]
                    + sum_in_use * per_in_use[field])

        sums = self.slot_sums
        for kind in range(4):  # stored, internal, reserved, external: KVWaste's fields 1-4
            sums[kind] += total_of(kind + 1)
        self.unshared_pages_sum += total_of(6)
        # Fields 5 (pages in use), 6 (pages without sharing) and the slots not free (fields 1-4), per step.
        u0, us, ut, uu = origin[5], per_slot[5], per_touched[5], per_in_use[5]
        w0, ws, wt, wu = origin[6], per_slot[6], per_touched[6], per_in_use[6]
        n0, ns, nt, nu = (sum(v[1:5]) for v in (origin, per_slot, per_touched, per_in_use))
        sharing, waste_of_used, used_samples = self.sharing_saving_sum, self.waste_of_used_sum, 0
        for slots, pages, held in zip(stored, touched, in_use):
            unshared = w0 + slots * ws + pages * wt + held * wu
            if unshared:
                sharing += 1.0 - (u0 + slots * us + pages * ut + held * uu) / unshared
            not_free = n0 + slots * ns + pages * nt + held * nu
            if not_free:
                waste_of_used += (not_free - slots) / not_free  # slots: what the step stores
                used_samples += 1
        self.sharing_saving_sum, self.waste_of_used_sum = sharing, waste_of_used
        self.num_used_samples += used_samples
        self.num_samples += n
        self.batch_size_sum += sum(batch_sizes)
        self.max_batch_size = max(self.max_batch_size, max(batch_sizes))
        self._last_run = (origin, deltas, (stored[-1], touched[-1], in_use[-1]))
        self._last = None

    @property
    def last(self) -> KVWaste | None:
        """The last snapshot added (a run's last one is worked out only when asked for)."""
        if self._last is None and self._last_run is not None:
            origin, deltas, point = self._last_run
            self._last = affine_waste(origin, deltas, point)
            self._last_run = None
        return self._last

    @last.setter
    def last(self, waste: KVWaste | None) -> None:
        self._last, self._last_run = waste, None

    def means(self) -> dict[str, float]:
        n = max(self.num_samples, 1)
        scale = n * max(self.total_slots, 1)
        sums = [*self.slot_sums, self.num_samples * self.total_slots - sum(self.slot_sums)]
        out = {f"kv_{kind}_mean": value / scale for kind, value in zip(KINDS, sums)}
        out["kv_waste_mean"] = sum(out[f"kv_{k}_mean"] for k in KINDS[1:4])
        out["kv_sharing_saving_mean"] = self.sharing_saving_sum / n
        out["kv_waste_of_used_mean"] = self.waste_of_used_sum / max(self.num_used_samples, 1)
        out["batch_size_mean"] = self.batch_size_sum / n
        out["batch_size_max"] = self.max_batch_size
        out["batch_size_mean_loaded"] = self.loaded_batch_size_sum / max(self.num_loaded_samples, 1)
        if self.last is not None:
            out.update({f"kv_{kind}": value for kind, value in self.last.fractions().items()})
            out["kv_waste"] = self.last.waste_fraction
        return out


class PressureSample(NamedTuple):  # a tuple: made every step, and cheaper to make than a frozen dataclass
    time: float
    evictions: int
    preemptions: int
    recomputed_tokens: int
    computed_tokens: int
    generated_tokens: int


class ThrashingMonitor:
    """Rates over a sliding window, and the thrashing warning."""

    def __init__(self, window_s: float = 10.0, recompute_threshold: float = 0.2, min_tokens: int = 256,
                 warn: bool = True) -> None:
        self.warn = warn  # log the warning (the engine does; the planner does not)
        self.window_s = window_s
        self.recompute_threshold = recompute_threshold
        self.min_tokens = min_tokens  # too few tokens in the window to judge: no verdict
        self.samples: deque[PressureSample] = deque()
        self.is_thrashing = False
        self.num_warnings = 0

    def add(self, sample: PressureSample) -> None:
        samples = self.samples
        samples.append(sample)
        while len(samples) > 2 and samples[1].time < sample.time - self.window_s:
            samples.popleft()
        first = samples[0] if len(samples) >= 2 else sample
        if first.recomputed_tokens == sample.recomputed_tokens and not self.is_thrashing:
            return  # nothing recomputed in the window: no verdict to reach (the common case, every step)
        # rates()'s window_computed_tokens and recompute_fraction, without building its dict every step
        computed = sample.computed_tokens - first.computed_tokens
        fraction = (sample.recomputed_tokens - first.recomputed_tokens) / computed if computed else 0.0
        thrashing = computed >= self.min_tokens and fraction > self.recompute_threshold
        if thrashing and not self.is_thrashing:
            rates = self.rates()
            self.num_warnings += 1
            if self.warn:  # the planner only reads the state
                logger.warning(
                    "KV cache thrashing: %.0f%% of the tokens computed in the last %.0f s were recomputation after "
                    "preemption (%.1f preemptions/s, %.1f cached-page evictions/s). Goodput is %.0f tokens/s against "
                    "%.0f computed. Lower admission_cap, raise the KV memory (kv_cache_memory / num_kv_blocks / "
                    "gpu_memory_utilization), or lower max_num_seqs.",
                    100 * rates["recompute_fraction"], self.window_s, rates["preemptions_per_s"],
                    rates["evictions_per_s"], rates["goodput_tokens_per_s"], rates["throughput_tokens_per_s"])
        self.is_thrashing = thrashing

    def quiet(self, recomputed_tokens: int) -> bool:
        """Whether samples that all count ``recomputed_tokens`` leave the verdict as it is.

        They do when nothing was recomputed since the window's first sample and
        the monitor is not thrashing: then :meth:`add` returns before judging.
        """
        return not self.is_thrashing and (not self.samples or self.samples[0].recomputed_tokens == recomputed_tokens)

    def kept_from(self, items: Sequence[T], time: Callable[[T], float]) -> int:
        """Where among these items, ascending in ``time``, the window starts once their samples are all added.

        Trimming at the last time keeps the last sample more than ``window_s``
        before it and every sample after: a quiet run (:meth:`quiet`) need
        build only those.
        """
        return max(bisect_left(items, time(items[-1]) - self.window_s, key=time) - 1, 0)

    def restart(self) -> None:
        """Forget the window: the samples added next begin it (a quiet run's, from :meth:`kept_from` on)."""
        self.samples.clear()

    def extend(self, samples: list[PressureSample]) -> None:
        """:meth:`add` each sample in turn; at once when they are :meth:`quiet`.

        Then no verdict can change, and trimming the window once, at the
        last sample's time, leaves it as trimming after each would.
        """
        if not samples:
            return
        window = self.samples
        last = samples[-1]
        if not self.quiet(last.recomputed_tokens) or samples[0].recomputed_tokens != last.recomputed_tokens:
            for sample in samples:
                self.add(sample)
            return
        window.extend(samples)
        while len(window) > 2 and window[1].time < last.time - self.window_s:
            window.popleft()

    def rates(self) -> dict[str, float]:
        if len(self.samples) < 2:
            return {"evictions_per_s": 0.0, "preemptions_per_s": 0.0, "recompute_fraction": 0.0,
                    "goodput_tokens_per_s": 0.0, "throughput_tokens_per_s": 0.0, "window_computed_tokens": 0.0}
        first, last = self.samples[0], self.samples[-1]
        span = max(last.time - first.time, 1e-9)
        computed = last.computed_tokens - first.computed_tokens
        return {
            "evictions_per_s": (last.evictions - first.evictions) / span,
            "preemptions_per_s": (last.preemptions - first.preemptions) / span,
            "recompute_fraction": (last.recomputed_tokens - first.recomputed_tokens) / computed if computed else 0.0,
            "goodput_tokens_per_s": (last.generated_tokens - first.generated_tokens) / span,
            "throughput_tokens_per_s": computed / span,
            "window_computed_tokens": float(computed),
        }
