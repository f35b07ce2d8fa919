"""Run workloads through the real engine under each KV layout, with one KV budget for all.

A *case* is one workload on one layout: every request is submitted at once
(so memory, not arrivals, limits the batch), the engine steps until all are
done, and the engine's own counters give the figures: batch size, waste by
kind (averaged over steps), preemptions, recomputed tokens, and wall time.
Every layout gets the same number of KV pages, the same ``max_num_seqs`` and
the same model, so the comparison isolates the memory layout.

The sharing runs measure what copy-on-write saves: the same requests with
``n`` parallel samples, and again as beam searches of width 2, 4 and 6, on
the paged layout, where the engine counts, every step, the pages in use
against the pages the same sequences would hold if nothing were shared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from kvpage.config import PREEMPTION_MODES
from kvpage.dashboard import Timeline
from kvpage.llm import LLM
from kvpage.sampling_params import RequestOutputKind, SamplingParams
from kvpage.sched.pressure import WasteStats
from kvpage.workloads import WORKLOAD_NAMES, Workload, WorkloadSpec, make_workload

LAYOUTS = ("paged", "contiguous-request", "contiguous-max")
SHARING_NS = (2, 4, 6)
BEAM_WIDTHS = (2, 4, 6)
SHARING_WORKLOADS = ("alpaca", "sharegpt")


@dataclass(frozen=True)
class BenchConfig:
    workloads: tuple[str, ...] = WORKLOAD_NAMES
    layouts: tuple[str, ...] = LAYOUTS
    num_requests: int = 64
    kv_tokens: int = 4096  # KV budget in token slots, the same for every layout: small enough to bind
    block_size: int = 16
    max_num_seqs: int = 256
    seed: int = 0
    sharing_ns: tuple[int, ...] = SHARING_NS
    beam_widths: tuple[int, ...] = BEAM_WIDTHS
    # Extra paged runs with these preemption modes, beside the default recompute.
    preemption_modes: tuple[str, ...] = ("swap",)
    sharing_requests: int = 16
    engine_options: dict[str, Any] = field(default_factory=dict)  # model, device, dtype, ...
    timelines: bool = False  # record each case's KV page map (kvpage bench --html)

    def validate(self) -> None:
        for name in self.workloads:
            if name not in WORKLOAD_NAMES:
                raise ValueError(f"workloads contains {name!r}; known workloads: {', '.join(WORKLOAD_NAMES)}")
        if not self.layouts:
            raise ValueError(f"layouts must name at least one layout of: {', '.join(LAYOUTS)}")
        for layout in self.layouts:
            if layout not in LAYOUTS:
                raise ValueError(f"layouts contains {layout!r}; known layouts: {', '.join(LAYOUTS)}")
        for name in ("num_requests", "kv_tokens", "max_num_seqs", "sharing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        for name in ("sharing_ns", "beam_widths"):
            for value in getattr(self, name):
                if not 1 <= value <= self.max_num_seqs:
                    raise ValueError(f"{name} contains {value}; each must be from 1 to max_num_seqs "
                                     f"({self.max_num_seqs})")
        for mode in self.preemption_modes:
            if mode not in PREEMPTION_MODES:
                raise ValueError(f"preemption_modes contains {mode!r}; known modes: {', '.join(PREEMPTION_MODES)}")
        if self.kv_tokens < self.block_size:
            raise ValueError(f"kv_tokens ({self.kv_tokens}) must hold at least one page of {self.block_size}")


@dataclass(frozen=True)
class CaseResult:
    workload: str
    layout: str
    n: int
    num_requests: int
    wall_s: float
    generated_tokens: int
    computed_tokens: int
    requests_per_s: float
    goodput_tokens_per_s: float  # generated tokens: recomputation never counts
    model_tokens_per_s: float    # every token the model ran, recomputation included
    batch_size_mean: float
    batch_size_mean_loaded: float  # over the steps where requests were waiting
    batch_size_max: int
    stored: float
    internal_fragmentation: float
    reservation_waste: float
    external_fragmentation: float
    waste: float
    waste_of_used: float  # the same, as a share of the memory not free
    sharing_saving: float
    num_preemptions: int
    recomputed_tokens: int
    num_steps: int
    preemption_mode: str = "recompute"
    num_swapped_out: int = 0
    beam_width: int = 0  # beam search of this width; 0: sampling (n samples)
    kv_cache_dtype: str = ""  # what the pages hold: the model dtype's name, or the 8-bit format's
    kv_bytes_per_token: int = 0  # one token's K/V over all layers, scales included
    kv_tokens: int = 0  # the budget in token slots

    @property
    def kv_memory_bytes(self) -> int:
        """The KV memory of the case's budget (token slots x bytes a token)."""
        return self.kv_bytes_per_token * self.kv_tokens

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_case(llm: LLM, workload: Workload, layout: str, n: int = 1, beam_width: int = 0,
             timeline: Timeline | None = None) -> CaseResult:
    """Submit every request of ``workload`` at once and step the engine until all are done.

    ``n`` samples per request, or with ``beam_width`` a beam search of that
    width returning its best beam.  A ``timeline`` is offered the engine's
    dashboard frame after every step.
    """
    engine = llm.engine
    engine.waste_stats = WasteStats()  # step averages of this case only
    before = engine.get_metrics()
    ids: list[str] = []
    for request in workload.requests:
        params = SamplingParams(n=n, temperature=0.0 if n == 1 or beam_width else 1.0, seed=len(ids),
                                ignore_eos=True, max_tokens=request.output_tokens,
                                output_kind=RequestOutputKind.FINAL_ONLY, use_beam_search=beam_width > 0,
                                beam_width=beam_width or None)
        ids.append(engine.add_request(None, {"prompt_token_ids": list(request.prompt_token_ids)}, params))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        if timeline is not None:
            timeline.offer(engine.thrashing.is_thrashing, engine.frame)
    wall = time.perf_counter() - start
    after = engine.get_metrics()
    def delta(name: str) -> int:
        return _count(after, name) - _count(before, name)

    generated = delta("num_generation_tokens")
    computed = delta("num_tokens_computed")
    if engine.kv.num_pages_in_use:
        raise RuntimeError(f"{engine.kv.num_pages_in_use} KV pages still in use after the {layout} run")
    return CaseResult(
        workload=workload.name, layout=layout, n=n, num_requests=len(ids), wall_s=wall, generated_tokens=generated,
        computed_tokens=computed, requests_per_s=len(ids) / wall, goodput_tokens_per_s=generated / wall,
        model_tokens_per_s=computed / wall, batch_size_mean=after["batch_size_mean"],
        batch_size_mean_loaded=after["batch_size_mean_loaded"],
        batch_size_max=int(after["batch_size_max"]), stored=after["kv_stored_mean"],
        internal_fragmentation=after["kv_internal_fragmentation_mean"],
        reservation_waste=after["kv_reservation_waste_mean"],
        external_fragmentation=after["kv_external_fragmentation_mean"], waste=after["kv_waste_mean"],
        waste_of_used=after["kv_waste_of_used_mean"],
        sharing_saving=after["kv_sharing_saving_mean"],
        num_preemptions=delta("num_preemptions"), recomputed_tokens=delta("num_recomputed_tokens"),
        num_steps=delta("step_num_steps"), preemption_mode=engine.config.scheduler.preemption_mode,
        num_swapped_out=delta("num_swapped_out"), beam_width=beam_width, kv_cache_dtype=engine.kv_cache_dtype,
        kv_bytes_per_token=int(after["kv_bytes_per_token"]),
        kv_tokens=int(after["kv_blocks_total"]) * engine.config.cache.block_size)


def _count(metrics: dict[str, float | int], name: str) -> int:
    """A counter of ``get_metrics()``: an integer, unlike the means and rates beside it."""
    value = metrics[name]
    if not isinstance(value, int):
        raise TypeError(f"engine metric {name!r} should be an integer count, got {value!r}")
    return value


def new_llm(config: BenchConfig, layout: str, preemption_mode: str = "recompute") -> LLM:
    options = {**config.engine_options, "kv_layout": layout, "block_size": config.block_size,
               "num_kv_blocks": config.kv_tokens // config.block_size, "max_num_seqs": config.max_num_seqs,
               "preemption_mode": preemption_mode}
    return LLM(**options)


@dataclass
class BenchResults:
    config: BenchConfig
    model: str
    device: str
    max_model_len: int
    cases: list[CaseResult] = field(default_factory=list)
    sharing: list[CaseResult] = field(default_factory=list)  # parallel samples, then beam searches
    preemption: list[CaseResult] = field(default_factory=list)  # paged, other preemption modes
    timelines: list[Timeline] = field(default_factory=list)  # with config.timelines: one per case, in order

    def timeline(self, name: str) -> Timeline | None:
        """A new timeline for the case ``name`` if the config asks for them."""
        if not self.config.timelines:
            return None
        self.timelines.append(Timeline(name))
        return self.timelines[-1]


def run_bench(config: BenchConfig, progress: Any = None) -> BenchResults:
    """Every workload under every layout, then the sharing runs; ``progress(str)`` hears of each case."""
    config.validate()
    say = progress or (lambda message: None)
    results: BenchResults | None = None
    for layout in config.layouts:
        llm = new_llm(config, layout)
        engine = llm.engine
        if results is None:
            results = BenchResults(config, str(engine.model_dir), str(engine.device), engine.max_model_len)
        for name in config.workloads:
            workload = workload_for(config, name, engine.max_model_len, engine.model_config.vocab_size)
            say(f"{name} on {layout} ({len(workload.requests)} requests)")
            results.cases.append(run_case(llm, workload, layout, timeline=results.timeline(f"{name} / {layout}")))
            engine.kv.reset_prefix_cache()  # each workload starts cold
        llm.shutdown()  # a tensor-parallel engine's ranks, before the next engine starts its own
    assert results is not None  # validate() requires a layout
    for mode in config.preemption_modes if "paged" in config.layouts else ():
        if mode == "recompute":
            continue  # the main runs
        llm = new_llm(config, "paged", mode)
        for name in config.workloads:
            workload = workload_for(config, name, llm.engine.max_model_len, llm.engine.model_config.vocab_size)
            say(f"{name} on paged, preemption by {mode}")
            results.preemption.append(run_case(llm, workload, "paged",
                                               timeline=results.timeline(f"{name} / paged, {mode}")))
            llm.engine.kv.reset_prefix_cache()
        llm.shutdown()
    if (config.sharing_ns or config.beam_widths) and "paged" in config.layouts:
        llm = new_llm(config, "paged")
        runs = [(n, 0) for n in config.sharing_ns] + [(1, width) for width in config.beam_widths]
        for name in SHARING_WORKLOADS:
            base = workload_for(replace(config, num_requests=config.sharing_requests), name,
                                llm.engine.max_model_len, llm.engine.model_config.vocab_size)
            for n, width in runs:
                what = f"beam width {width}" if width else f"n={n}"
                say(f"{name} with {what} on paged")
                results.sharing.append(run_case(llm, base, "paged", n=n, beam_width=width,
                                                timeline=results.timeline(f"{name} / paged, {what}")))
                llm.engine.kv.reset_prefix_cache()
        llm.shutdown()
    return results


def workload_for(config: BenchConfig, name: str, max_model_len: int, vocab_size: int) -> Workload:
    return make_workload(WorkloadSpec(name=name, num_requests=config.num_requests, seed=config.seed,
                                      vocab_size=vocab_size, max_model_len=max_model_len))
