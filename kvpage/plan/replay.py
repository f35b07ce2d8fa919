"""Replay a trace through the real scheduler and memory manager in virtual time (pure Python).

The replay builds the same KV manager and :class:`~kvpage.sched.Scheduler`
the engine builds (:meth:`~kvpage.sched.Scheduler.from_config`, from the
same configuration classes), and runs the engine's own step loop
(:class:`~kvpage.sched.step_loop.StepLoop`, in the synchronous or the
asynchronous order) with one change: its executor, :class:`VirtualDevice`,
runs no model; a cost model says how long each step took, and a virtual
clock moves on by that much.  Requests
join when the clock passes their arrival time.  Admission, chunked prefill,
preemption by recompute or swap, prefix caching, copy-on-write and beam
search all run through the scheduler's own code, so every memory figure
(pages, waste, preemptions, evictions) is the one a real engine would see
under the same schedule.

Runs of decode-only steps between arrivals go through
:mod:`kvpage.plan.fast_forward`, an exact shortcut: the same figures, step
for step, at a fraction of the cost.

The "sampled" tokens are arbitrary but distinct per sequence and position
(so no two sequences share generated pages by accident); every request
generates exactly its ``output_tokens`` (EOS is ignored), as in the trace.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

from kvpage.config import EngineConfig
from kvpage.dashboard import Timeline, capture
from kvpage.modes import KVCacheDtype, KVLayout, PrefixHash
from kvpage.plan.cost import DecodeTimer, ModelShape, StepShape
from kvpage.plan.fast_forward import FIRST_FAKE_TOKEN, DecodeSums, fake_token, fast_forward
from kvpage.plan.recorder import RequestTiming, StepRecorder
from kvpage.plan.shadow import LayoutShadow, ShadowResult
from kvpage.sampling_params import SamplingParams
from kvpage.sched import Request, Scheduler, Sequence, StepLoop
from kvpage.sched.preemption import SwapCostModel
from kvpage.step_io import PageOpKind, SampledToken, SchedulerOutput
from kvpage.validation import check_tensor_parallel
from kvpage.workloads import Workload, WorkloadRequest


class CostModel(Protocol):
    @property
    def async_scheduling(self) -> bool:
        """Measured on an engine that overlapped its steps: replays follow that order (ReplaySettings.ordered_by)."""

    def step_time(self, shape: StepShape) -> float: ...

    def for_engine(self, tensor_parallel_size: int, kv_cache_dtype: KVCacheDtype) -> CostModel:
        """This model for an engine of ``tensor_parallel_size`` ranks storing K/V as ``kv_cache_dtype``.

        ValueError if it cannot say (a calibration times its own engine's ranks and KV format only).
        """
        ...

    def decode_step(self, batch: int) -> DecodeTimer:
        """The seconds of a decode-only step of ``batch`` sequences, as a function of its K/V sums (the same floats)."""


    def describe(self) -> str: ...


@dataclass(frozen=True)
class ReplaySettings:
    """The engine options the replay honours (the same names as ``LLM(...)``), plus the KV size."""

    options: dict[str, Any] = field(default_factory=dict)  # block_size, max_num_seqs, admission_cap, ...
    kv_tokens: int | None = None  # KV budget in token slots; else options' kv_cache_memory / num_kv_blocks
    max_model_len: int = 4096
    vocab_size: int = 32000
    device_type: str = "cuda"  # which defaults the auto preemption cost model takes

    @property
    def async_scheduling(self) -> bool:
        """Replay the engine's asynchronous step order (``async_scheduling=True``); the default is synchronous.

        Unset (None), a replay takes its cost model's order (:meth:`ordered_by`).

        The engine plans step N+1 before step N's tokens are known, so a
        request that ends in step N frees its pages one plan later.  The
        replay follows that order exactly when asked, but not by default:
        the decode fast-forward assumes the synchronous order, and without
        it a replay runs about 2.5 times slower.
        """
        return bool(self.options.get("async_scheduling"))

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.options.get("tensor_parallel_size", 1))

    @property
    def kv_cache_dtype(self) -> KVCacheDtype:
        return cast(KVCacheDtype, self.options.get("kv_cache_dtype", "auto"))  # EngineConfig checks it

    def ordered_by(self, cost: CostModel) -> ReplaySettings:
        """These settings, in the step order of the engine ``cost`` was measured on unless they name one.

        A calibration of an asynchronous engine times the pipeline's period,
        and the engine frees a finished request's pages a plan later: replayed
        in the synchronous order, the same schedule would preempt differently.
        """
        if self.options.get("async_scheduling") is not None or not cost.async_scheduling:
            return self
        return replace(self, options={**self.options, "async_scheduling": True})


def step_shape(out: SchedulerOutput, bytes_per_page: int, decodes: DecodeSums = (0, 0, 0)) -> StepShape:
    """The features of a planned step that its cost depends on.

    ``decodes`` adds running sequences that are not in ``out``, each
    computing one decode token: (how many, K/V tokens they read, the longest
    context), as the decode fast-forward counts them.
    """
    num_decodes, kv, longest_decode = decodes
    tokens = sampled = decodes_count = num_decodes
    pairs = kv  # a decode token attends to its whole context
    prefills = 0
    for seq in out.sequences:
        n = len(seq.input_token_ids)
        end = seq.start_position + n
        tokens += n
        sampled += seq.sample
        kv += end
        pairs += n * seq.start_position + n * (n + 1) // 2
        if n == 1:
            decodes_count += 1
            longest_decode = max(longest_decode, end)
        else:
            prefills += 1
    moved = sum(len(ops.pairs) for ops in out.page_ops if ops.kind is not PageOpKind.COPY)
    return StepShape(num_decodes + len(out.sequences), prefills, tokens, sampled, kv, decodes_count * longest_decode,
                     pairs, moved * bytes_per_page)


@dataclass
class ReplayResult:
    settings: ReplaySettings
    cost_model: str
    num_pages: int
    block_size: int
    bytes_per_page: int  # of one rank, in the replay's KV format (kv_cache_dtype), scales included
    duration_s: float
    timings: list[RequestTiming]
    counters: dict[str, float]
    waste: dict[str, float]
    series: dict[str, list[float]]
    thrashing_onset_s: float | None
    max_recompute_fraction: float
    shadows: dict[str, ShadowResult] = field(default_factory=dict)  # by layout: kvpage.plan.shadow
    _summary: dict[str, float] | None = field(default=None, init=False, repr=False, compare=False)

    def summary(self) -> dict[str, float]:
        """Every figure of the replay by name (computed once: the percentiles sort every request's timings)."""
        if self._summary is None:
            self._summary = self._figures()
        return dict(self._summary)

    def _figures(self) -> dict[str, float]:
        duration = max(self.duration_s, 1e-12)
        out = {"num_requests": float(len(self.timings)), "duration_s": self.duration_s,
               "goodput_tokens_per_s": self.counters["num_generated_tokens"] / duration,
               "model_tokens_per_s": self.counters["num_tokens_computed"] / duration,
               **latency_summary(self.timings, duration)}
        out.update(self.counters)
        out.update(self.waste)
        # Capacity: token slots, and the bytes each takes (a rank's share of the KV heads).
        out["kv_capacity_tokens"] = float(self.num_pages * self.block_size)
        out["kv_bytes_per_token"] = self.bytes_per_page / self.block_size
        out["thrashing_onset_s"] = -1.0 if self.thrashing_onset_s is None else self.thrashing_onset_s
        out["max_recompute_fraction"] = self.max_recompute_fraction
        return out


def latency_summary(timings: list[RequestTiming], duration_s: float) -> dict[str, float]:
    """Requests/s, and TTFT, TPOT and E2E (mean, p50, p90, p99) over the finished requests."""
    ends = [(t, t.finished) for t in timings if t.finished is not None]
    ttft = [t.first_token - t.arrival for t, _ in ends if t.first_token is not None]
    e2e = [end - t.arrival for t, end in ends]
    tpot = [(end - t.first_token) / (t.output_tokens - 1) for t, end in ends
            if t.first_token is not None and t.output_tokens > 1]
    out = {"requests_per_s": len(ends) / duration_s}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        out[f"{name}_mean_s"] = sum(values) / len(values) if values else 0.0
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = percentile(values, q)
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# The same chained page keys as the engine's, by Python's hash instead of sha256: a third of the cost a page,
# and a replay keys tens of millions of pages for no one to attack (kvpage.kv.prefix_hash).
REPLAY_PREFIX_HASH: PrefixHash = "builtin"


def build_scheduler(settings: ReplaySettings, model: ModelShape) -> tuple[Scheduler, int, int]:
    """The engine's KV manager and scheduler for these settings; returns (scheduler, pages, bytes a page)."""
    options = dict(settings.options)
    options.setdefault("max_model_len", settings.max_model_len)
    options.setdefault("prefix_caching_hash_algo", REPLAY_PREFIX_HASH)
    config = EngineConfig.from_kwargs(**options)
    cache, sched_config = config.cache, config.scheduler
    # KV memory is each rank's, as the engine's: a rank's page holds its share of the KV heads.
    bytes_per_page = model.kv_bytes_per_token_per_rank(config.parallel.tensor_parallel_size,
                                                       cache.kv_cache_dtype) * cache.block_size
    if settings.kv_tokens is not None:
        num_pages = settings.kv_tokens // cache.block_size
    elif cache.num_kv_blocks is not None:
        num_pages = cache.num_kv_blocks
    elif cache.kv_cache_memory is not None:
        num_pages = cache.kv_cache_memory // bytes_per_page
    else:
        raise ValueError("give the KV size: kv_tokens, kv_cache_memory or num_kv_blocks")
    if num_pages < 1:
        raise ValueError(f"the KV budget holds no page of {cache.block_size} tokens ({bytes_per_page} bytes a page)")
    tp = config.parallel.tensor_parallel_size
    if tp > 1 and model.intermediate_size:  # a shape read from a config: the engine's refusals
        check_tensor_parallel(tp, model.num_heads, model.num_kv_heads, model.intermediate_size)
    # Recompute against swap as the engine weighs them: one rank's FLOPs and bytes.
    swap_cost = SwapCostModel.for_device(settings.device_type, model.num_parameters // tp, bytes_per_page,
                                         model.num_layers, model.num_heads // tp, model.head_dim)
    max_len = sched_config.max_model_len or settings.max_model_len
    return Scheduler.from_config(cache, sched_config, num_pages, bytes_per_page, max_len, eos_token_ids=(),
                                 swap_cost=swap_cost), num_pages, bytes_per_page


def trace_sampling_params(request: WorkloadRequest, **extra: Any) -> SamplingParams:
    """A trace request's parameters: exactly ``output_tokens`` tokens, n samples or a beam search."""
    common = {"max_tokens": request.output_tokens, "ignore_eos": True, **extra}
    if request.beam_width:
        return SamplingParams(n=request.n, use_beam_search=True, beam_width=request.beam_width, temperature=0.0,
                              **common)
    return SamplingParams(n=request.n, temperature=1.0 if request.n > 1 else 0.0, **common)


def _fake_tokens(out: SchedulerOutput, vocab: int) -> list[SampledToken]:
    """Each sequence's :func:`fake_token`; beams get synthetic candidates, in the vocabulary, that vary by position."""
    sampled = []
    span = vocab - FIRST_FAKE_TOKEN
    for seq in out.sequences:
        if not seq.sample:
            continue
        if seq.sampling_params.use_beam_search:
            position = seq.start_position + len(seq.input_token_ids)
            seed = vocab + (seq.seq_id << 32) + position
            width = seq.sampling_params.beam_width or 1
            candidates = [(3 + (seed + 31 * k) % span, -0.1 * k - ((seq.seq_id * 31 + k * 17) % 7) * 0.01)
                          for k in range(2 * width)]
            candidates.sort(key=lambda c: -c[1])
            sampled.append(SampledToken(candidates[0][0], None, candidates))
        else:
            sampled.append(SampledToken(fake_token(seq.seq_id, vocab)))
    return sampled


def replay(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
           fast: bool = True, shadow_layouts: Iterable[KVLayout] = (),
           timeline: Timeline | None = None) -> ReplayResult:
    """Run ``workload`` through the scheduler in virtual time; see the module docstring.

    ``fast`` lets :func:`~kvpage.plan.fast_forward.fast_forward` run the
    decode-only stretches (the same result; False steps through every one).
    ``shadow_layouts`` (contiguous layouts, beside a paged replay) are
    followed by :class:`~kvpage.plan.shadow.LayoutShadow` s: the result's
    ``shadows`` say what each measured, or why it could not.  A
    ``timeline`` is offered a dashboard frame after every step that is not
    fast-forwarded (``kvpage plan --html`` replays with ``fast=False``).
    """
    cost = cost.for_engine(settings.tensor_parallel_size, settings.kv_cache_dtype)
    with _fewer_collections():
        return _replay(workload, settings.ordered_by(cost), cost, model, fast, tuple(shadow_layouts), timeline)


@contextmanager
def _fewer_collections(threshold: int = 100_000) -> Iterator[None]:
    """Run the cyclic garbage collector's youngest generation every ``threshold`` allocations, not every 700.

    A replay makes millions of short-lived objects a second; at the default
    threshold the collector took 9% of a 100,000-request replay.  Finished
    requests (cycles through their sequences) are still collected, later.
    """
    old = gc.get_threshold()
    gc.set_threshold(threshold, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


@dataclass(frozen=True, slots=True)
class VirtualStep:
    """A step launched on the virtual device: what it runs, and when the device finishes it."""

    out: SchedulerOutput
    end: float


class VirtualDevice:
    """The replay's :class:`~kvpage.sched.step_loop.Executor`: steps take the cost model's time on a virtual clock.

    The device runs one step at a time, in launch order: a step starts when
    the host launches it or when the device finishes the step before,
    whichever is later.  The host waits for a step's tokens until it ends.
    """

    def __init__(self, cost: CostModel, bytes_per_page: int, vocab_size: int) -> None:
        self.cost = cost
        self.bytes_per_page = bytes_per_page
        self.vocab_size = vocab_size
        self.host = 0.0  # the host's clock: when it schedules the next step
        self.device_free = 0.0  # when the device finishes the last step launched

    def launch(self, out: SchedulerOutput, previous: VirtualStep | None) -> VirtualStep:
        start = max(self.host, self.device_free)
        end = start if out.is_empty else start + self.cost.step_time(step_shape(out, self.bytes_per_page))
        self.device_free = end
        return VirtualStep(out, end)

    def wait(self, handle: VirtualStep) -> list[SampledToken]:
        self.host = max(self.host, handle.end)
        return _fake_tokens(handle.out, self.vocab_size)

    def idle_until(self, when: float) -> None:
        """Nothing to run until ``when`` (the next arrival)."""
        self.host = self.device_free = max(self.host, when)

    def decode_step(self, batch: int) -> DecodeTimer:
        return self.cost.decode_step(batch)

    def run_with_decodes(self, out: SchedulerOutput, decodes: DecodeSums) -> tuple[float, list[SampledToken]]:
        shape = step_shape(out, self.bytes_per_page, decodes)
        return self.cost.step_time(shape), _fake_tokens(out, self.vocab_size)


class TraceArrivals:
    """The trace's requests not yet added to the scheduler, in arrival order (request ids are trace indices)."""

    def __init__(self, sched: Scheduler, requests: tuple[WorkloadRequest, ...]) -> None:
        self.sched = sched
        self.requests = requests
        self.index = 0
        self.next_time = requests[0].arrival_time if requests else math.inf
        # Requests alike share one SamplingParams (nothing writes to one): checking each anew cost 3% of a replay.
        self._params: dict[tuple[int, int, int], SamplingParams] = {}

    @property
    def exhausted(self) -> bool:
        return self.index == len(self.requests)

    def add_due(self, now: float) -> None:
        requests, index = self.requests, self.index
        while index < len(requests) and requests[index].arrival_time <= now:
            r = requests[index]
            key = (r.output_tokens, r.n, r.beam_width)
            params = self._params.get(key)
            if params is None:
                params = self._params[key] = trace_sampling_params(r)
            self.sched.add_request(Request(str(index), None, list(r.prompt_token_ids), params, r.arrival_time,
                                           priority=r.priority))
            index += 1
        self.index = index
        self.next_time = requests[index].arrival_time if index < len(requests) else math.inf


def _replay(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
            fast: bool, shadow_layouts: tuple[KVLayout, ...], timeline: Timeline | None) -> ReplayResult:
    sched, num_pages, bytes_per_page = build_scheduler(settings, model)
    if shadow_layouts and sched.kv.reservation_tokens(1) is not None:
        raise ValueError("layout shadows follow a paged replay; this one is contiguous")
    recorder = StepRecorder(sched, workload, num_pages)
    shadows = [LayoutShadow(layout, sched.config, num_pages, sched.kv.block_size, sched.max_model_len,
                            recorder.waste_stats, lambda: recorder.num_steps) for layout in shadow_layouts]
    sched.life.observers.extend(shadows)
    device = VirtualDevice(cost, bytes_per_page, settings.vocab_size)
    sched.life.events.clock = lambda: device.host

    def after_step(out: SchedulerOutput, touched: list[Sequence]) -> list[None]:
        at = device.host  # the step's end: the host has just waited for it
        recorder.tokens(touched, at)
        if not out.is_empty:  # a step that did nothing is no sample (as in the engine)
            waste = sched.kv_waste()
            recorder.step(at, len(out.sequences), waste)
            if timeline is not None:
                monitor = recorder.monitor
                timeline.offer(monitor.is_thrashing,
                               lambda: capture(sched, at, recorder.num_steps, waste, len(out.sequences), monitor))
        return []

    loop: StepLoop[VirtualStep, None] = StepLoop(sched, device, settings.async_scheduling, after_step)
    arrivals = TraceArrivals(sched, workload.requests)
    while not arrivals.exhausted or loop.has_unfinished():
        arrivals.add_due(device.host)
        if not loop.has_unfinished():
            device.idle_until(arrivals.next_time)
            continue
        if fast and not loop.overlap:
            now, steps = fast_forward(sched, device.host, arrivals, device, recorder)
            if steps:
                device.host = device.device_free = now
                continue
        loop.step()
        if not loop.made_progress:
            if arrivals.exhausted:
                raise RuntimeError("the scheduler made no progress with nothing left to arrive")
            device.idle_until(arrivals.next_time)
    kv = sched.kv
    if kv.num_pages_in_use:
        raise RuntimeError(f"{kv.num_pages_in_use} pages still in use after the replay")
    counters = sched.counters
    counter_values = {name: float(getattr(counters, name)) for name in counters.__dataclass_fields__}
    counter_values["num_evictions"] = float(kv.num_evictions)
    counter_values["num_pages"] = float(num_pages)
    return ReplayResult(settings, cost.describe(), num_pages, kv.block_size, bytes_per_page, device.host,
                        recorder.timings,
                        counter_values, recorder.waste_stats.means(), recorder.series.points, recorder.onset,
                        recorder.max_fraction,
                        {shadow.layout: shadow.result(counters.num_preemptions) for shadow in shadows})
