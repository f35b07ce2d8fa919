"""The planner's questions: sweeps with an SLO, the onset of thrashing, and what paging saves (pure Python).

* :func:`run_sweep` replays the trace once per combination of settings
  (``block_size=16,32 admission_cap=0.9,1.0 ...``; ``replicas=1,2`` deals it
  to that many engines, :mod:`kvpage.plan.replicas`) and recommends the one
  with the highest goodput among those that meet the SLO
  (``ttft_p99=2s,tpot_p99=100ms``), the lowest TTFT p99 breaking near-ties;
* :func:`thrashing_onset` replays the trace with its arrivals compressed
  to higher request rates and reports the first rate at which the
  recomputed share of computed tokens passes the thrashing threshold
  (:mod:`kvpage.plan.onset` finds the same rate with fewer replays);
* ``kv_cache_dtype=auto,fp8`` replays it with 16-bit and 8-bit pages in the
  same KV memory: what FP8 buys on this traffic (the step-time model reads
  the format's bytes a K/V token);
* :func:`layout_savings` replays it under the paged layout and the
  contiguous ones with the same KV memory, and reports the batch and the
  memory each needs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kvpage.config import GIB, KV_LAYOUTS, PREEMPTION_MODES
from kvpage.modes import KV_CACHE_DTYPES
from kvpage.plan.cost import ModelShape
from kvpage.plan.onset import offered_rate, rate_row, scale_rate
from kvpage.plan.replay import CostModel, ReplayResult, ReplaySettings, replay
from kvpage.plan.replicas import replay_replicas
from kvpage.workloads import Workload

# Sweepable settings: name -> parser of one value.
SWEEP_KEYS: dict[str, Callable[[str], Any]] = {
    "block_size": int, "admission_cap": float, "max_num_seqs": int, "max_num_batched_tokens": int,
    "kv_memory": lambda v: parse_bytes(v), "kv_tokens": int, "preemption_mode": str, "headroom_policy": str,
    "watermark": float, "kv_layout": str, "tensor_parallel_size": int, "kv_cache_dtype": str,
    "replicas": int,  # engines sharing the trace round-robin (kvpage.plan.replicas), not an engine setting
}
SLO_METRICS = ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "tpot_p99", "e2e_p50", "e2e_p90",
               "e2e_p99", "ttft_mean", "tpot_mean", "e2e_mean")


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB|B)?\s*", text)
    if not match:
        raise ValueError(f"kv_memory must be a size like 8GiB, 512MiB or a number of bytes, got {text!r}")
    unit = {"GiB": GIB, "GB": 10**9, "MiB": 1 << 20, "MB": 10**6, "B": 1, None: GIB}[match.group(2)]
    return int(float(match.group(1)) * unit)


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s)?\s*", text)
    if not match:
        raise ValueError(f"an SLO bound must be a duration like 2s or 100ms, got {text!r}")
    return float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)


def parse_slo(text: str) -> dict[str, float]:
    """``ttft_p99=2s,tpot_p99=100ms`` -> {"ttft_p99": 2.0, "tpot_p99": 0.1}."""
    slo = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, bound = part.partition("=")
        if name not in SLO_METRICS or not bound:
            raise ValueError(f"slo entries are METRIC=DURATION with METRIC one of {', '.join(SLO_METRICS)}; "
                             f"got {part!r}")
        slo[name] = parse_duration(bound)
    return slo


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """``["block_size=16,32", "admission_cap=0.9,1.0"]`` -> {"block_size": [16, 32], ...}."""
    sweep: dict[str, list[Any]] = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in SWEEP_KEYS or not values:
            raise ValueError(f"sweep entries are NAME=V1,V2,... with NAME one of {', '.join(SWEEP_KEYS)}; "
                             f"got {item!r}")
        try:
            parsed = [SWEEP_KEYS[name](v.strip()) for v in values.split(",") if v.strip()]
        except ValueError as exc:
            raise ValueError(f"sweep {name}: {exc}") from None
        allowed = {"preemption_mode": PREEMPTION_MODES, "kv_layout": KV_LAYOUTS,
                   "kv_cache_dtype": KV_CACHE_DTYPES}.get(name)
        for value in parsed:
            if allowed is not None and value not in allowed:
                raise ValueError(f"sweep {name} value {value!r} is not one of {', '.join(allowed)}")
        sweep[name] = parsed
    return sweep


def apply_setting(settings: ReplaySettings, name: str, value: Any) -> ReplaySettings:
    if name == "kv_tokens":
        return replace(settings, kv_tokens=value)
    options = dict(settings.options)
    if name == "kv_memory":
        options.pop("num_kv_blocks", None)
        options["kv_cache_memory"] = value
        return replace(settings, options=options, kv_tokens=None)
    options[name] = value
    return replace(settings, options=options)


@dataclass
class SweepPoint:
    setting: dict[str, Any]
    result: ReplayResult
    meets_slo: bool
    misses: list[str]


def run_sweep(workload: Workload, base: ReplaySettings, sweep: dict[str, list[Any]], slo: dict[str, float],
              cost: CostModel, model: ModelShape) -> tuple[list[SweepPoint], SweepPoint | None]:
    """Every combination of the sweep's values; returns the points and the recommended one (or None)."""
    points = []
    names = list(sweep)
    for values in itertools.product(*(sweep[n] for n in names)) if names else [()]:
        settings, replicas = base, 1
        for name, value in zip(names, values):
            if name == "replicas":
                replicas = value
            else:
                settings = apply_setting(settings, name, value)
        result = replay_replicas(workload, settings, cost, model, replicas)
        summary = result.summary()
        misses = [f"{metric} {summary[metric + '_s']:.3g}s > {bound:.3g}s" for metric, bound in slo.items()
                  if summary[metric + "_s"] > bound]
        points.append(SweepPoint(dict(zip(names, values)), result, not misses, misses))
    passing = [p for p in points if p.meets_slo]
    if not passing:
        return points, None
    # Most goodput; among settings within 1% of it (a trace that never loads them all ties), the lowest
    # TTFT p99, then the least recomputed work.
    top = max(p.result.summary()["goodput_tokens_per_s"] for p in passing)
    near = [p for p in passing if p.result.summary()["goodput_tokens_per_s"] >= 0.99 * top]
    best = min(near, key=lambda p: (p.result.summary()["ttft_p99_s"], p.result.summary()["num_recomputed_tokens"]))
    return points, best


def thrashing_onset(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
                    factors: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0),
                    base: ReplayResult | None = None) -> tuple[list[dict[str, float]], float | None]:
    """Replay at each rate factor; returns per-rate figures and the first rate that thrashes (or None).

    The exhaustive search: every factor, the whole trace each time (``base``,
    the replay at factor 1 when already run, stands in for that one).
    :func:`kvpage.plan.onset.fast_thrashing_onset` finds the same onset
    with far fewer replays.
    """
    rows = []
    onset = None
    base_rate = offered_rate(workload)
    for factor in factors:
        result = base if factor == 1.0 and base is not None else replay(scale_rate(workload, factor), settings,
                                                                          cost, model)
        rows.append(rate_row(result, base_rate * factor, factor, len(workload.requests)))
        if result.thrashing_onset_s is not None and onset is None:
            onset = base_rate * factor
    return rows, onset


def layout_savings(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
                   base: ReplayResult | None = None) -> dict[str, dict[str, float]]:
    """Each layout with the same KV memory: batch, waste, throughput, and the memory the trace held.

    ``base`` is the replay of ``workload`` under ``settings`` when already
    run: it is the replay of the settings' own layout, so that one is not
    run again, and a layout it followed as a shadow (:mod:`kvpage.plan.shadow`)
    is not replayed unless its shadow broke.
    """
    out: dict[str, dict[str, float]] = {}
    own = settings.options.get("kv_layout", "paged")
    for layout in KV_LAYOUTS:
        shadow = base.shadows.get(layout) if base is not None else None
        if base is not None and shadow is not None and shadow.waste is not None:
            # The same schedule, so the same batches and throughput; the layout's own memory figures.
            result = base
            s = {**base.summary(), **shadow.waste}
        else:
            options = {**settings.options, "kv_layout": layout}
            result = base if base is not None and layout == own else replay(
                workload, replace(settings, options=options), cost, model)
            s = result.summary()
        held = 1.0 - s["kv_free_mean"]
        out[layout] = {"batch_size_mean": s["batch_size_mean"], "batch_size_mean_loaded": s["batch_size_mean_loaded"],
                       "batch_size_max": s["batch_size_max"], "kv_waste_mean": s["kv_waste_mean"],
                       "kv_held_mean": held,
                       "kv_held_bytes_mean": held * result.num_pages * result.bytes_per_page,
                       "goodput_tokens_per_s": s["goodput_tokens_per_s"], "requests_per_s": s["requests_per_s"]}
    return out
