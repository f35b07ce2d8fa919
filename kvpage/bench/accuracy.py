"""How well ``kvpage plan`` predicts the real engine: calibrate, run workloads for real, replay them.

The comparison is only as good as the conditions on both sides are alike.
A shared machine's speed drifts by several percent over a minute (other
tenants, clock boost): calibrating for a minute and then running the
workloads compares two different machines, and the ratios wander with the
drift, not with the planner.  So the calibration grid runs in slices, one
repeat each, and every slice is followed by one real run of every workload.
Both sides then see the same mix of fast and slow moments, and the samples
of all slices are fitted together as one calibration would fit them.

Used by ``benchmarks/plan_accuracy.py`` and by the CPU accuracy test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from kvpage.bench.calibrate import CalibrationGrid, fit_steps, measure_steps
from kvpage.bench.clock import StepClock
from kvpage.bench.trace_run import TraceRunResult, run_trace
from kvpage.llm import LLM
from kvpage.plan.cost import CalibratedCostModel, ModelShape
from kvpage.plan.replay import ReplaySettings, replay
from kvpage.workloads import Workload

COMPARED = ("goodput_tokens_per_s", "tpot_mean_s")


@dataclass(frozen=True)
class AccuracyRow:
    workload: str
    num_requests: int
    real: dict[str, float]  # the COMPARED figures, averaged over the real runs
    planned: dict[str, float]
    real_preemptions: float  # of the first real run
    planned_preemptions: float

    def ratio(self, key: str) -> float:
        """Predicted over measured."""
        return self.planned[key] / self.real[key]


def measure_accuracy(new_llm: Callable[[], LLM], workloads: list[tuple[str, Workload]], settings: ReplaySettings,
                     model: ModelShape, grid: CalibrationGrid | None = None, clock: StepClock | None = None
                     ) -> tuple[CalibratedCostModel, list[AccuracyRow]]:
    """Calibrate and run every workload ``grid.repeats`` times, interleaved; then replay each one.

    Steps are timed by the wall clock, or by ``clock`` (a stand-in device, for tests).
    """
    grid = grid or CalibrationGrid()
    if grid.repeats < 1:
        raise ValueError(f"grid.repeats must be at least 1, got {grid.repeats}")
    one_repeat = replace(grid, repeats=1)
    samples = []
    runs: dict[str, list[TraceRunResult]] = {name: [] for name, _ in workloads}
    calibrated = None
    for repeat in range(grid.repeats):
        calibrated = new_llm()  # a fresh engine, as `kvpage bench --calibrate` starts one
        samples += measure_steps(calibrated, one_repeat, seed=repeat, clock=clock)
        calibrated.shutdown()  # a tensor-parallel engine's ranks: one engine a process at a time
        for name, workload in workloads:
            llm = new_llm()
            runs[name].append(run_trace(llm, workload, clock))
            llm.shutdown()
    assert calibrated is not None  # grid.repeats >= 1, checked above
    cost = fit_steps(calibrated, samples)
    rows = []
    for name, workload in workloads:
        planned = replay(workload, settings, cost, model).summary()
        summaries = [run.summary() for run in runs[name]]
        real = {key: sum(s[key] for s in summaries) / len(summaries) for key in COMPARED}
        rows.append(AccuracyRow(name, len(workload.requests), real, {key: planned[key] for key in COMPARED},
                                runs[name][0].metrics["num_preemptions"], planned["num_preemptions"]))
    return cost, rows
