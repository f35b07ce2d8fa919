"""Prometheus metrics of a running server, through ``prometheus_client``.

Names follow vLLM's where the concept is the same, under the ``kvpage:``
prefix, so a vLLM dashboard works once the prefix is changed:
``num_requests_running``/``waiting``, ``kv_cache_usage_perc``,
``prefix_cache_queries``/``hits``, ``num_preemptions``, ``prompt_tokens``,
``generation_tokens``, and the latency histograms
``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds`` and ``request_queue_time_seconds``.

kvpage's own: ``kv_pages_free`` / ``kv_pages_in_use`` / ``kv_pages_cached_free``,
``kv_internal_fragmentation`` (empty slots in used pages, as a fraction of
the cache), ``kv_cache_evictions``, ``recomputed_tokens`` (K/V computed again
after preemption), and two rates over a sliding window: ``goodput_tokens_per_second``
(newly generated tokens, which never include recomputed work) beside
``model_tokens_per_second`` (every token the model ran, recomputation
included).  The gap between them is the price of preemption.

Each server owns its registry: no module-level state.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvpage.engine import LLMEngine
    from kvpage.outputs import RequestOutput

PREFIX = "kvpage:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0)

# (engine metric, exposed name, help); counters get prometheus' "_total" suffix.
_GAUGES = (
    ("num_requests_running", "num_requests_running", "Requests in the running batch"),
    ("num_requests_waiting", "num_requests_waiting", "Requests waiting to be scheduled"),
    ("kv_cache_usage_perc", "kv_cache_usage_perc", "Fraction of KV pages in use (1 = full)"),
    ("kv_blocks_free", "kv_pages_free", "KV pages holding nothing"),
    ("kv_blocks_used", "kv_pages_in_use", "KV pages referenced by running sequences"),
    ("kv_blocks_cached", "kv_pages_cached_free", "Free KV pages still holding a cached prefix"),
    ("kv_blocks_total", "kv_pages_total", "KV pages in the cache"),
    ("kv_cache_bytes", "kv_cache_bytes", "Bytes of KV cache over all ranks (an 8-bit cache's scale bytes included)"),
    ("kv_bytes_per_token", "kv_bytes_per_token", "Bytes one token's K/V takes over all layers and ranks"),
    ("kv_internal_fragmentation", "kv_internal_fragmentation",
     "Empty slots in in-use pages, as a fraction of all KV slots"),
    ("kv_stored", "kv_stored_fraction", "KV slots holding a live token's K/V (last step)"),
    ("kv_reservation_waste", "kv_reservation_waste", "KV slots reserved for tokens not generated yet (last step)"),
    ("kv_external_fragmentation", "kv_external_fragmentation",
     "Free KV slots no waiting request can use (last step)"),
    ("kv_waste_mean", "kv_waste_mean", "Internal + reservation + external waste, averaged over all steps"),
    ("kv_sharing_saving_mean", "kv_sharing_saving_mean", "Fraction of pages saved by sharing, step average"),
    ("batch_size_mean", "batch_size_mean", "Sequences per step, averaged over all steps"),
    ("evictions_per_s", "kv_evictions_per_second", "Cached-page evictions per second (sliding window)"),
    ("preemptions_per_s", "preemptions_per_second", "Preemptions per second (sliding window)"),
    ("recompute_fraction", "recompute_fraction", "Recomputed share of computed tokens (sliding window)"),
    ("is_thrashing", "is_thrashing", "1 while the recomputed fraction is past its threshold"),
)
_COUNTERS = (
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    ("num_preemptions", "num_preemptions", "Sequences preempted"),
    ("num_prompt_tokens_computed", "prompt_tokens", "Prompt tokens computed (cache hits excluded)"),
    ("num_generation_tokens", "generation_tokens", "Tokens generated"),
    ("kv_evictions", "kv_cache_evictions", "Cached prefix pages evicted for reuse"),
    ("num_recomputed_tokens", "recomputed_tokens", "Tokens whose K/V was computed again after preemption"),
    ("num_swapped_out", "swapped_out", "Preemptions that moved the victim's pages to host memory"),
    ("num_requests_delayed_max_num_seqs", "requests_delayed_max_num_seqs", "Requests held back by max_num_seqs"),
    ("num_requests_delayed_admission_cap", "requests_delayed_admission_cap", "Requests held back by admission_cap"),
    ("num_requests_delayed_headroom", "requests_delayed_headroom", "Requests held back by the headroom policy"),
    ("num_requests_delayed_pages", "requests_delayed_pages", "Requests held back for want of KV pages"),
)


class Telemetry:
    """Histograms fed by the engine loop, plus engine counters read at scrape time."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        self.window_s = window_s
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first scheduled",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason",
                               ["finished_reason"], registry=self.registry)
        self.failures = Counter(PREFIX + "request_failures", "Requests failed by a server fault",
                                registry=self.registry)
        self._samples: deque[tuple[float, int, int]] = deque()  # (time, generated, computed)
        self._lock = threading.Lock()
        self._engine_metrics: dict[str, Any] = {}
        self.registry.register(_EngineCollector(self))

    # ----- engine loop thread -----
    def on_step(self, engine: LLMEngine) -> None:
        counters = engine.scheduler.counters
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, counters.num_generated_tokens, counters.num_tokens_computed))
            while len(self._samples) > 2 and self._samples[1][0] < now - self.window_s:
                self._samples.popleft()

    def on_tokens(self, output: RequestOutput, stream: Any, now: float) -> None:
        if stream.last_token_time is None:
            if output.metrics is not None and output.metrics.time_to_first_token is not None:
                self.ttft.observe(output.metrics.time_to_first_token)
        else:
            self.itl.observe(now - stream.last_token_time)
        stream.last_token_time = now

    def on_finish(self, output: RequestOutput) -> None:
        metrics = output.metrics
        if metrics is not None:
            if metrics.e2e_latency is not None:
                self.e2e.observe(metrics.e2e_latency)
            if metrics.queue_time is not None:
                self.queue_time.observe(metrics.queue_time)
        for completion in output.outputs:
            self.success.labels(finished_reason=completion.finish_reason or "abort").inc()

    # ----- any thread -----
    def rates(self) -> tuple[float, float]:
        """(goodput, model tokens) per second over the window; zero when idle."""
        with self._lock:
            if len(self._samples) < 2:
                return 0.0, 0.0
            (t0, g0, c0), (t1, g1, c1) = self._samples[0], self._samples[-1]
            if time.monotonic() - t1 > self.window_s or t1 <= t0:
                return 0.0, 0.0
            return (g1 - g0) / (t1 - t0), (c1 - c0) / (t1 - t0)

    def render(self, engine_metrics: dict[str, Any]) -> bytes:
        """Prometheus text for the given engine metrics (read on the engine loop)."""
        self._engine_metrics = engine_metrics
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        values = self.telemetry._engine_metrics
        for key, name, doc in _GAUGES:
            if key in values:
                yield GaugeMetricFamily(PREFIX + name, doc, value=values[key])
        for key, name, doc in _COUNTERS:
            if key in values:
                yield CounterMetricFamily(PREFIX + name, doc, value=values[key])
        goodput, model_rate = self.telemetry.rates()
        yield GaugeMetricFamily(PREFIX + "goodput_tokens_per_second",
                                "Generated tokens per second over the window (no recomputed work)", value=goodput)
        yield GaugeMetricFamily(PREFIX + "model_tokens_per_second",
                                "Tokens run through the model per second, recomputation included",
                                value=model_rate)
