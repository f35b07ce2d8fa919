"""Run a trace on the real engine in wall-clock time: the ground truth the planner is checked against.

Requests are added when the clock passes their arrival time (the engine
idles until the next one if nothing is left to run), each generates exactly
its ``output_tokens`` (EOS ignored), and the same figures the planner
predicts are measured: throughput, TTFT, TPOT and E2E from each request's
first-token and finish times (the engine's own request metrics), and the
engine's memory counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvpage.llm import LLM
from kvpage.plan.replay import RequestTiming, latency_summary, trace_sampling_params
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


def run_trace(llm: LLM, workload: Workload) -> TraceRunResult:
    engine = llm.engine
    engine.waste_stats = WasteStats()
    requests = workload.requests
    timings = [RequestTiming(r.arrival_time, output_tokens=r.output_tokens) for r in requests]
    added_at = [0.0] * len(requests)
    index = 0
    start = time.perf_counter()
    while index < len(requests) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while index < len(requests) and requests[index].arrival_time <= now:
            r = requests[index]
            engine.add_request(str(index), {"prompt_token_ids": list(r.prompt_token_ids)},
                               trace_sampling_params(r, output_kind=RequestOutputKind.FINAL_ONLY, seed=0),
                               priority=r.priority)
            added_at[index] = now
            index += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[index].arrival_time - now))
            continue
        for out in engine.step():  # final outputs only, as the planner's calibration ran
            i = int(out.request_id)
            metrics = out.metrics
            assert metrics is not None and metrics.time_to_first_token is not None
            timings[i].first_token = added_at[i] + metrics.time_to_first_token
            timings[i].finished = added_at[i] + (metrics.e2e_latency or 0.0)
    duration = time.perf_counter() - start
    if engine.kv.num_pages_in_use:
        raise RuntimeError(f"{engine.kv.num_pages_in_use} pages still in use after the trace")
    return TraceRunResult(duration, timings, engine.get_metrics())
