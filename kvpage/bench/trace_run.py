"""Run a trace on the real engine: the ground truth the planner is checked against.

Requests are added when the clock passes their arrival time (the engine
idles until the next one if nothing is left to run), each generates exactly
its ``output_tokens`` (EOS ignored), and the same figures the planner
predicts are measured: throughput, TTFT, TPOT and E2E from each request's
first-token and finish times, and the engine's memory counters.

The clock is the wall's (the engine's own request metrics), or a
:class:`~kvpage.bench.clock.StepClock`'s: then time moves only by the
seconds the clock gives each step the engine runs, idle time is skipped to
the next arrival, and a request's tokens count at the end of the step that
made them, as in the replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvpage.bench.clock import StepClock
from kvpage.llm import LLM
from kvpage.plan.recorder import RequestTiming
from kvpage.plan.replay import latency_summary, trace_sampling_params
from kvpage.sampling_params import RequestOutputKind
from kvpage.sched.pressure import WasteStats
from kvpage.workloads import Workload


@dataclass
class TraceRunResult:
    duration_s: float
    timings: list[RequestTiming]
    metrics: dict[str, float]  # the engine's get_metrics() at the end

    def summary(self) -> dict[str, float]:
        """The figures the planner predicts (kvpage.plan.replay.ReplayResult.summary's names)."""
        return {"duration_s": self.duration_s,
                "goodput_tokens_per_s": self.metrics["num_generation_tokens"] / self.duration_s,
                **latency_summary(self.timings, self.duration_s)}


def run_trace(llm: LLM, workload: Workload, clock: StepClock | None = None) -> TraceRunResult:
    """Run ``workload`` on ``llm`` in wall-clock time, or in ``clock``'s time when given."""
    engine = llm.engine
    engine.waste_stats = WasteStats()
    requests = workload.requests
    timings = [RequestTiming(r.arrival_time, output_tokens=r.output_tokens) for r in requests]
    # On the wall clock only final outputs are built, as in the calibration; their metrics give the times.
    kind = RequestOutputKind.FINAL_ONLY if clock is None else RequestOutputKind.CUMULATIVE
    added_at = [0.0] * len(requests)
    index = 0
    start = time.perf_counter()
    virtual = 0.0  # clock's time

    def now() -> float:
        return time.perf_counter() - start if clock is None else virtual

    while index < len(requests) or engine.has_unfinished_requests():
        while index < len(requests) and requests[index].arrival_time <= now():
            r = requests[index]
            engine.add_request(str(index), {"prompt_token_ids": list(r.prompt_token_ids)},
                               trace_sampling_params(r, output_kind=kind, seed=0), priority=r.priority)
            added_at[index] = now()
            index += 1
        if not engine.has_unfinished_requests():
            if clock is None:
                time.sleep(max(0.0, requests[index].arrival_time - now()))
            else:
                virtual = requests[index].arrival_time
            continue
        before = engine.last_step
        outputs = engine.step()
        if clock is not None and engine.last_step is not before and engine.last_step is not None:
            virtual += clock.step_seconds(engine.last_step)
        for out in outputs:
            timing = timings[int(out.request_id)]
            if clock is not None:  # a token in this step, at the step's end (as the replay counts it)
                timing.first_token = now() if timing.first_token is None else timing.first_token
                timing.finished = now() if out.finished else None
                continue
            metrics = out.metrics
            assert metrics is not None and metrics.time_to_first_token is not None
            added = added_at[int(out.request_id)]
            timing.first_token = added + metrics.time_to_first_token
            timing.finished = added + (metrics.e2e_latency or 0.0)
    if engine.kv.num_pages_in_use:
        raise RuntimeError(f"{engine.kv.num_pages_in_use} pages still in use after the trace")
    return TraceRunResult(now(), timings, engine.get_metrics())
