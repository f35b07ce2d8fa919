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
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from kvpage.kv import KVWaste
from kvpage.kv.waste import KINDS

logger = logging.getLogger("kvpage.engine")


@dataclass
class WasteStats:
    num_samples: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    sharing_saving_sum: float = 0.0
    # Waste as a share of the memory that is not free (held or unusable), over steps where any is.
    waste_of_used_sum: float = 0.0
    num_used_samples: int = 0
    batch_size_sum: int = 0
    max_batch_size: int = 0
    # Steps with requests waiting: the memory-bound regime, where the layout decides the batch.
    loaded_batch_size_sum: int = 0
    num_loaded_samples: int = 0
    last: KVWaste | None = None

    def add(self, waste: KVWaste, batch_size: int, requests_waiting: bool = False) -> None:
        self.num_samples += 1
        if requests_waiting:
            self.loaded_batch_size_sum += batch_size
            self.num_loaded_samples += 1
        sums = self.sums
        for kind, value in zip(KINDS, waste.fraction_values()):  # fractions() without its dict, every step
            sums[kind] += value
        self.sharing_saving_sum += waste.sharing_saving
        not_free = waste.total_slots - waste.free_slots
        if not_free:
            self.waste_of_used_sum += (not_free - waste.stored_slots) / not_free
            self.num_used_samples += 1
        self.batch_size_sum += batch_size
        if batch_size > self.max_batch_size:
            self.max_batch_size = batch_size
        self.last = waste

    def means(self) -> dict[str, float]:
        n = max(self.num_samples, 1)
        out = {f"kv_{kind}_mean": value / n for kind, value in self.sums.items()}
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
        # rates()'s window_computed_tokens and recompute_fraction, without building its dict every step
        first = samples[0] if len(samples) >= 2 else sample
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
