"""The engine: requests in, tokens out, one batched step at a time.

``LLMEngine`` ties the pieces together. Each :meth:`LLMEngine.step`

1. asks the :class:`~kvpage.scheduler.Scheduler` for a plan (which
   sequences run, how many tokens each, which pages to copy first);
2. hands it to the :class:`~kvpage.worker.ModelRunner`, which runs the model
   over the paged cache and samples;
3. feeds the sampled tokens back to the scheduler (stop tokens, lengths,
   page commits), checks stop strings, and reports what changed.

The step order itself is :class:`~kvpage.sched.step_loop.StepLoop`'s,
the same the planner replays; the engine supplies its executor
(:class:`RunnerExecutor`: the runner's prepare, launch and wait) and what
happens after each step (stop strings, pressure samples, outputs).  The
offline :class:`~kvpage.llm.LLM` API loops over ``step`` until every
request is done.

With *asynchronous scheduling* (on by default on a GPU) the host does not
wait for a step before scheduling the next: ``step`` schedules and launches
step N while step N-1 still runs on the device, and only then waits for
N-1's tokens and applies them, so host work (scheduling, input
preparation, stop checks, outputs) hides behind device work. Sequences of
step N whose input is the token N-1 is sampling get it on the device; a
sequence that N-1 stops (EOS, a stop string) wastes its one token of step
N, which is discarded.

With ``tensor_parallel_size`` > 1 this process is rank 0, the driver: it
starts the follower ranks (:mod:`kvpage.parallel`), builds its own shard as
they build theirs, and hands each step to them before running it; the
scheduler, the KV manager and sampling stay here, once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from typing import Any

from kvpage.config import EngineConfig
from kvpage.dashboard import Frame, capture
from kvpage.kv.format import kv_format
from kvpage.metrics import RequestCounters, StepTimings
from kvpage.model.source import open_model_source
from kvpage.ops.collectives import TPGroup
from kvpage.output_builder import OutputBuilder
from kvpage.outputs import RequestOutput
from kvpage.parallel import Ranks, build_rank, rank_device, resolve_device, runner_options, start_ranks
from kvpage.sampling_params import SamplingParams
from kvpage.sched import Request, RequestTimes, Scheduler, Sequence, StepLoop
from kvpage.sched.admission import DELAY_RULES
from kvpage.sched.preemption import SwapCostModel
from kvpage.sched.pressure import PressureSample, ThrashingMonitor, WasteStats
from kvpage.step_io import SampledToken, SchedulerOutput
from kvpage.worker import LaunchedStep, ModelRunner, RunnerOptions

PromptInput = str | dict[str, Any] | list[int]


class RunnerExecutor:
    """The engine's :class:`~kvpage.sched.step_loop.Executor`: steps run on the model, timed by phase.

    Under tensor parallelism each step first goes to the follower ranks (``ranks``), which run it on their
    shards beside this one.
    """

    def __init__(self, runner: ModelRunner, timings: StepTimings, ranks: Ranks | None = None) -> None:
        self.runner = runner
        self.timings = timings
        self.ranks = ranks

    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        start = time.perf_counter()
        if self.ranks is not None:
            return self.ranks.guard(lambda: self._launch(out, previous, start))
        return self._launch(out, previous, start)

    def _launch(self, out: SchedulerOutput, previous: LaunchedStep | None, start: float) -> LaunchedStep:
        if self.ranks is not None:
            self.ranks.send(out)
        inputs = self.runner.prepare(out)
        prepared = time.perf_counter()
        launched = self.runner.launch(out, inputs, previous)
        self.timings.prepare_s += prepared - start
        self.timings.model_s += time.perf_counter() - prepared
        return launched

    def wait(self, handle: LaunchedStep) -> list[SampledToken]:
        start = time.perf_counter()
        sampled = handle.result() if self.ranks is None else self.ranks.guard(handle.result)
        self.timings.model_s += time.perf_counter() - start
        return sampled


class LLMEngine:
    """Serves many requests at once over one model and one paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        load = config.load
        base_device = resolve_device(load.device)
        self.ranks = start_ranks(config, base_device)  # None: one device
        tp = self.ranks.tp if self.ranks is not None else TPGroup.single()
        try:
            rank = build_rank(config, tp, rank_device(base_device, 0))
        except BaseException:
            if self.ranks is not None:
                self.ranks.shutdown()
            raise
        self.device, self.max_model_len, self.runner = rank.device, rank.max_model_len, rank.runner
        self.model_dir = open_model_source(load.model).path  # the directory, or the .gguf file
        loaded = rank.loaded
        self.model_config, self.model, self.dtype = loaded.config, loaded.model, loaded.dtype
        self.tokenizer, self.eos_token_ids = loaded.tokenizer, loaded.eos_token_ids
        self.cache_shape = rank.cache_shape
        mc, per_page, num_pages = self.model_config, rank.bytes_per_page, rank.cache_shape.num_pages
        # A page's K/V over every rank (replicated KV heads count on each rank that holds them).
        self.bytes_per_page = per_page * tp.size
        # What the pages hold: "auto" resolved to the model dtype's name, or the 8-bit format (kvpage.kv.format).
        self.kv_cache_dtype = (str(self.dtype).removeprefix("torch.") if config.cache.kv_cache_dtype == "auto"
                               else kv_format(config.cache.kv_cache_dtype, 1).name)
        # Recompute against swap, as one rank weighs them: its shard's FLOPs, its share of a page over the link.
        swap_cost = SwapCostModel.for_device(self.device.type, sum(p.numel() for p in self.model.parameters()),
                                             per_page, mc.num_layers, self.model.shard.num_heads, mc.head_dim)
        self.scheduler = Scheduler.from_config(config.cache, config.scheduler, num_pages, per_page,
                                               self.max_model_len, self.eos_token_ids, swap_cost)
        self.kv = self.scheduler.kv
        self.started = time.monotonic()  # the dashboard's time 0 (kvpage.dashboard)
        self.scheduler.life.events.clock = self.uptime
        # The last step that ran (not an empty one): the planner's calibration reads its shape.
        self.last_step: SchedulerOutput | None = None
        self.waste_stats = WasteStats()
        self.thrashing = ThrashingMonitor()
        self.timings = StepTimings()
        self.request_counters = RequestCounters()
        self.outputs = OutputBuilder(self.tokenizer, self.scheduler.life, self.request_counters)
        self._request_ids = itertools.count()
        requested = config.scheduler.async_scheduling
        self.async_scheduling = self.device.type == "cuda" if requested is None else requested
        self.loop = StepLoop(self.scheduler, RunnerExecutor(self.runner, self.timings, self.ranks),
                             self.async_scheduling, self._after_step, self.timings)

    @property
    def runner_options(self) -> RunnerOptions:
        return runner_options(self.config)

    @property
    def tensor_parallel_size(self) -> int:
        return self.ranks.tp.size if self.ranks is not None else 1

    def shutdown(self) -> None:
        """Stop the follower ranks' processes (tensor parallelism); a one-device engine has none."""
        if self.ranks is not None:
            self.ranks.shutdown()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ----- requests -------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """Validate a prompt and return (text, token ids)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError(f"model {str(self.model_dir)!r} has no tokenizer; pass "
                                 "{'prompt_token_ids': [...]} instead of text")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, list):
            return None, self._check_token_ids(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_token_ids(self, token_ids: Any) -> list[int]:
        if not isinstance(token_ids, (list, tuple)) or len(token_ids) == 0:
            raise ValueError(f"prompt_token_ids must be a non-empty list of integers, got {token_ids!r}")
        vocab = self.model_config.vocab_size
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids contains {t!r}; token ids must be integers in [0, {vocab})")
        return list(token_ids)

    def add_request(self, request_id: str | None, prompt: PromptInput,
                    sampling_params: SamplingParams | None = None, *, priority: int = 0,
                    arrival_time: float | None = None) -> str:
        """Queue a request; raises ValueError (and queues nothing) if it is invalid or can never fit."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        try:
            text, token_ids = self.tokenize_prompt(prompt)
            vocab = self.model_config.vocab_size
            bad_stop = [t for t in params.stop_token_ids or [] if t >= vocab]
            if bad_stop:
                raise ValueError(f"stop_token_ids contains {bad_stop[0]}; token ids must be in [0, {vocab})")
            if params.stop_strings and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer, and this model has none; use stop_token_ids")
            now = time.monotonic()
            request = Request(
                request_id=str(next(self._request_ids)) if request_id is None else request_id,
                prompt=text, prompt_token_ids=token_ids, sampling_params=params,
                arrival_time=now if arrival_time is None else arrival_time, priority=priority,
                times=RequestTimes(arrival=now),
            )
            self.scheduler.add_request(request)
        except ValueError:
            self.request_counters.num_requests_rejected += 1
            raise
        self.request_counters.num_requests_added += 1
        return request.request_id

    def abort_request(self, request_id: str | Iterable[str]) -> bool:
        """Stop one request (or several) now and free its pages. False if none was unfinished."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        aborted = False
        for rid in ids:
            request = self.scheduler.abort_request(rid)
            if request is None:
                continue
            aborted = True
            self.request_counters.num_requests_aborted += 1
            self.outputs.forget(request)
        return aborted

    abort = abort_request

    def has_unfinished_requests(self) -> bool:
        return self.loop.has_unfinished()

    @property
    def _in_flight(self) -> object | None:
        """The step still running on the device, if any (asynchronous scheduling)."""
        return self.loop.in_flight

    # ----- stepping -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batched step; returns the requests that produced tokens or finished.

        With asynchronous scheduling these are the outputs of the step launched
        by the previous call, and the step launched now is still running.
        """
        return self.loop.step()

    def drain(self) -> list[RequestOutput]:
        """Wait for the step in flight, if any, and apply it; returns its outputs."""
        return self.loop.drain()

    def _after_step(self, out: SchedulerOutput, touched: list[Sequence]) -> list[RequestOutput]:
        """A step's tokens are resolved: stop strings, pressure signals, outputs."""
        start = time.perf_counter()
        self.outputs.check_stop_strings(touched)
        if not out.is_empty:  # a step that did nothing is no sample (the planner skips it too)
            self.last_step = out
            self._sample_pressure(len(out.sequences))
        checked = time.perf_counter()
        outputs = self.outputs.collect(touched)
        timings = self.timings
        timings.update_s += checked - start
        timings.output_s += time.perf_counter() - checked
        return outputs

    def _sample_pressure(self, batch_size: int) -> None:
        self.waste_stats.add(self.scheduler.kv_waste(), batch_size, bool(self.scheduler.waiting))
        c = self.scheduler.counters
        self.thrashing.add(PressureSample(time.monotonic(), self.kv.num_evictions, c.num_preemptions,
                                          c.num_recomputed_tokens, c.num_tokens_computed, c.num_generated_tokens))

    # ----- introspection ---------------------------------------------------------------
    def uptime(self) -> float:
        """Seconds since the engine was built: the time of dashboard frames and events."""
        return time.monotonic() - self.started

    def frame(self) -> Frame:
        """The KV page map now, with the pressure signals (:mod:`kvpage.dashboard`); call it between steps."""
        sched = self.scheduler
        batch = len(self.last_step.sequences) if self.last_step is not None and sched.running else 0
        return capture(sched, self.uptime(), self.timings.num_steps, self.waste_stats.last, batch, self.thrashing)

    def get_metrics(self) -> dict[str, float | int]:
        usage = self.kv.usage()
        counters = self.scheduler.counters
        metrics: dict[str, float | int] = {
            "num_requests_running": len({s.request.request_id for s in self.scheduler.running}),
            "num_requests_waiting": len({s.request.request_id for s in self.scheduler.waiting}),
            "num_seqs_running": len(self.scheduler.running),
            "num_preemptions": counters.num_preemptions,
            "num_recomputed_tokens": counters.num_recomputed_tokens,
            "num_swapped_out": counters.num_swapped_out,
            "num_swapped_in": counters.num_swapped_in,
            "num_tokens_computed": counters.num_tokens_computed,
            "num_prompt_tokens_computed": counters.num_prompt_tokens_computed,
            "num_generation_tokens": counters.num_generated_tokens,
            "prefix_cache_queries": usage.num_prefix_cache_queries,
            "prefix_cache_hits": usage.num_prefix_cache_hits,
            "kv_blocks_total": usage.num_pages_total,
            "kv_blocks_used": usage.num_pages_used,
            "kv_blocks_cached": usage.num_pages_cached_free,
            "kv_blocks_free": usage.num_pages_free,
            "kv_block_size": usage.block_size,
            "kv_cache_usage_perc": usage.usage_fraction,
            "kv_tokens_stored": usage.num_tokens_stored,
            "kv_internal_fragmentation_slots": usage.internal_fragmentation_slots,
            "kv_internal_fragmentation": usage.internal_fragmentation,
            "kv_evictions": usage.num_evictions,
            "kv_cache_bytes": self.bytes_per_page * usage.num_pages_total,
            "kv_bytes_per_token": self.bytes_per_page // usage.block_size,
            "tensor_parallel_size": self.tensor_parallel_size,
        }
        rc = self.request_counters
        metrics.update(num_requests_added=rc.num_requests_added, num_requests_finished=rc.num_requests_finished,
                       num_requests_aborted=rc.num_requests_aborted, num_requests_rejected=rc.num_requests_rejected)
        metrics.update(self.timings.as_dict())
        metrics.update(self.waste_stats.means())
        metrics.update(self.thrashing.rates(), is_thrashing=int(self.thrashing.is_thrashing))
        admission = self.scheduler.admission
        metrics.update({f"num_requests_delayed_{rule}": getattr(admission.counters, rule) for rule in DELAY_RULES})
        return metrics
