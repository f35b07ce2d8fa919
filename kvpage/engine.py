"""The engine: requests in, tokens out, one batched step at a time.

``LLMEngine`` ties the pieces together. Each :meth:`LLMEngine.step`

1. asks the :class:`~kvpage.scheduler.Scheduler` for a plan (which
   sequences run, how many tokens each, which pages to copy first);
2. hands it to the :class:`~kvpage.worker.ModelRunner`, which runs the model
   over the paged cache and samples;
3. feeds the sampled tokens back to the scheduler (stop tokens, lengths,
   page commits), checks stop strings, and reports what changed.

The offline :class:`~kvpage.llm.LLM` API loops over ``step`` until every
request is done.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kvpage.admission import DELAY_RULES
from kvpage.batch import SchedulerOutput
from kvpage.config import GIB, EngineConfig
from kvpage.detokenizer import IncrementalDetokenizer, find_stop_string
from kvpage.kv import ContiguousKVCacheManager, KVCacheManager
from kvpage.metrics import RequestCounters, StepTimings
from kvpage.model import ModelConfig, demo_model_dir, load_model, resolve_dtype
from kvpage.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvpage.preemption import SwapCostModel
from kvpage.pressure import PressureSample, ThrashingMonitor, WasteStats
from kvpage.request import Request, RequestTimes, Sequence, SequenceStatus
from kvpage.sampling_params import RequestOutputKind, SamplingParams
from kvpage.scheduler import Scheduler
from kvpage.worker import KVCacheShape, ModelRunner, page_bytes

PromptInput = str | dict[str, Any] | list[int]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return device


def load_tokenizer(path: Path) -> Any | None:
    """The directory's Hugging Face tokenizer, or None if it ships none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / name).is_file() for name in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # never run code from a model dir


def read_eos_token_ids(model_dir: Path, config: ModelConfig) -> tuple[int, ...]:
    """EOS ids as generation_config.json gives them (what HF's generate stops on), else config.json's."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list):
            return tuple(int(t) for t in eos)
    return config.eos_token_ids


def size_kv_cache(config: EngineConfig, bytes_per_page: int, max_model_len: int, device: torch.device) -> int:
    """Number of KV pages: ``num_kv_blocks``, else ``kv_cache_memory`` bytes, else the device default.

    The device default is ``gpu_memory_utilization`` of the GPU less what is
    already in use, or ``cpu_kv_cache_space`` on a CPU, and in both cases no
    more than the batch could ever fill (``max_num_seqs`` sequences of
    ``max_model_len`` tokens): a tiny model would otherwise get millions of
    pages it can never use.
    """
    cache = config.cache
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if cache.kv_cache_memory is not None:
        budget = cache.kv_cache_memory
    else:
        if device.type == "cuda":
            budget = _gpu_kv_budget(cache.gpu_memory_utilization, bytes_per_page, device)
        else:
            budget = cache.cpu_kv_cache_space
        pages_per_seq = -(-max_model_len // cache.block_size)
        budget = min(budget, config.scheduler.max_num_seqs * pages_per_seq * bytes_per_page)
    num_pages = budget // bytes_per_page
    if num_pages < 1:
        raise ValueError(f"the KV cache budget ({budget} bytes) is smaller than one page ({bytes_per_page} bytes); "
                         "raise kv_cache_memory or gpu_memory_utilization")
    return num_pages


def _gpu_kv_budget(utilization: float, bytes_per_page: int, device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    # Blocks torch's caching allocator holds but no tensor uses are ours to reuse.
    reclaimable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    in_use = total - free - reclaimable
    budget = int(total * utilization) - in_use
    if budget < bytes_per_page:
        raise ValueError(
            f"gpu_memory_utilization={utilization} allows {total * utilization / GIB:.1f} GiB of the GPU's "
            f"{total / GIB:.1f} GiB, but {in_use / GIB:.1f} GiB are already in use (weights, other engines or "
            "processes), leaving no room for the KV cache; raise gpu_memory_utilization or pass "
            "kv_cache_memory / num_kv_blocks")
    return budget


class LLMEngine:
    """Serves many requests at once over one model and one paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        load = config.load
        self.device = resolve_device(load.device)
        if load.model is None:
            self.model_dir = demo_model_dir()
        else:
            self.model_dir = Path(load.model).expanduser()
            if not self.model_dir.is_dir():
                raise FileNotFoundError(f"model directory {str(self.model_dir)!r} does not exist")
        self.model_config = ModelConfig.from_model_dir(self.model_dir)
        self.dtype = resolve_dtype(load.dtype, self.model_config, self.device)
        torch.manual_seed(load.seed)
        self.model = load_model(self.model_dir, self.dtype, self.device)
        self.tokenizer = load_tokenizer(Path(load.tokenizer) if load.tokenizer else self.model_dir)
        self.eos_token_ids = read_eos_token_ids(self.model_dir, self.model_config)

        max_positions = self.model_config.max_position_embeddings
        self.max_model_len = config.scheduler.max_model_len or max_positions
        if self.max_model_len > max_positions:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({max_positions})")
        mc = self.model_config
        per_page = page_bytes(mc.num_layers, config.cache.block_size, mc.num_kv_heads, mc.head_dim, self.dtype)
        num_pages = size_kv_cache(config, per_page, self.max_model_len, self.device)
        self.cache_shape = KVCacheShape(mc.num_layers, num_pages, config.cache.block_size, mc.num_kv_heads,
                                        mc.head_dim, self.dtype)
        layout = config.cache.kv_layout
        swapping = config.scheduler.preemption_mode != "recompute" and layout == "paged"
        num_host_pages = int(config.cache.swap_space * GIB) // per_page if swapping else 0
        self.kv: KVCacheManager | ContiguousKVCacheManager = (
            KVCacheManager(num_pages, config.cache.block_size, config.cache.enable_prefix_caching, num_host_pages)
            if layout == "paged" else ContiguousKVCacheManager(num_pages, config.cache.block_size))
        swap_cost = SwapCostModel.for_device(self.device.type, sum(p.numel() for p in self.model.parameters()),
                                             per_page, mc.num_layers, mc.num_attention_heads, mc.head_dim)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.eos_token_ids, layout,
                                   swap_cost)
        self.last_plan: SchedulerOutput | None = None
        self.waste_stats = WasteStats()
        self.thrashing = ThrashingMonitor()
        self.runner = ModelRunner(self.model, self.cache_shape, self.device, load.seed, self.eos_token_ids,
                                  max_num_seqs=config.scheduler.max_num_seqs,
                                  max_pages_per_seq=self.kv.pages_for_tokens(self.max_model_len),
                                  num_host_pages=num_host_pages)
        self.timings = StepTimings()
        self.request_counters = RequestCounters()
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._request_ids = itertools.count()

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
            for seq in request.sequences:
                self._detokenizers.pop(seq.seq_id, None)
        return aborted

    abort = abort_request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- stepping -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batched step; returns the requests that produced tokens or finished."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        self.last_plan = plan  # what the step ran: the planner's calibration reads its shape
        t1 = time.perf_counter()
        inputs = self.runner.prepare(plan)
        t2 = time.perf_counter()
        self.runner.apply_page_ops(plan.page_ops)
        sampled = self.runner.run(inputs) if inputs is not None else []
        t3 = time.perf_counter()
        touched = self.scheduler.update(plan, sampled)
        self._check_stop_strings(touched)
        self._sample_pressure(len(plan.sequences))
        t4 = time.perf_counter()
        outputs = self._collect_outputs(touched)
        t5 = time.perf_counter()
        timings = self.timings
        timings.num_steps += 1
        timings.schedule_s += t1 - t0
        timings.prepare_s += t2 - t1
        timings.model_s += t3 - t2
        timings.update_s += t4 - t3
        timings.output_s += t5 - t4
        return outputs

    def _sample_pressure(self, batch_size: int) -> None:
        self.waste_stats.add(self.scheduler.kv_waste(), batch_size, bool(self.scheduler.waiting))
        c = self.scheduler.counters
        self.thrashing.add(PressureSample(time.monotonic(), self.kv.num_evictions, c.num_preemptions,
                                          c.num_recomputed_tokens, c.num_tokens_computed, c.num_generated_tokens))

    def _detokenizer(self, seq: Sequence) -> IncrementalDetokenizer:
        detok = self._detokenizers.get(seq.seq_id)
        if detok is None:
            detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids, seq.num_prompt_tokens,
                                           seq.request.sampling_params.skip_special_tokens)
            self._detokenizers[seq.seq_id] = detok
        return detok

    def _check_stop_strings(self, touched: list[Sequence]) -> None:
        for seq in touched:
            stops = seq.request.sampling_params.stop_strings
            if not stops or seq.status is SequenceStatus.FINISHED_ABORTED:
                continue
            detok = self._detokenizer(seq)
            new_text = detok.update()
            if seq.is_finished:
                new_text += detok.flush()
            match = find_stop_string(detok.text, len(new_text), stops) if new_text else None
            if match is None:
                continue
            index, stop = match
            keep = index + len(stop) if seq.request.sampling_params.include_stop_str_in_output else index
            detok.freeze(detok.text[:keep])
            if seq.is_finished:  # ended by EOS or length in this very step: the stop string still wins
                seq.status = SequenceStatus.FINISHED_STOPPED
                seq.stop_reason = stop
            else:
                self.scheduler.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, stop)

    def _text_of(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        detok = self._detokenizer(seq)
        detok.update()
        if seq.is_finished:
            detok.flush()
        return detok.text

    def _collect_outputs(self, touched: list[Sequence]) -> list[RequestOutput]:
        requests: dict[str, Request] = {}
        for seq in touched:
            requests.setdefault(seq.request.request_id, seq.request)
        outputs = []
        now = time.monotonic()
        for request in requests.values():
            finished = request.is_finished
            times = request.times
            if times is not None:
                if times.first_token is None:
                    times.first_token = now
                if finished:
                    times.finished = now
            if finished:
                self.request_counters.num_requests_finished += 1
            elif request.sampling_params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self._request_output(request))
        return outputs

    def _request_output(self, request: Request) -> RequestOutput:
        completions = []
        finished = request.is_finished
        if request.beam is not None:  # the best finished hypotheses, not the sequences that carried them
            skip = request.sampling_params.skip_special_tokens
            completions = [CompletionOutput(
                index=i, token_ids=list(h.token_ids), finish_reason=h.finish_reason, stop_reason=None, logprobs=None,
                text=self.tokenizer.decode(list(h.token_ids), skip_special_tokens=skip) if self.tokenizer else "")
                for i, h in enumerate(request.beam.results())]
        for seq in request.sequences if request.beam is None else ():
            decode = (lambda s=seq: self._text_of(s))
            text: str | Any = self._text_of(seq) if finished else decode
            completions.append(CompletionOutput(
                index=seq.sample_index, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.output_logprobs) if seq.output_logprobs is not None else None, text=text))
        if finished:
            for seq in request.sequences:
                self._detokenizers.pop(seq.seq_id, None)
        times = request.times
        metrics = None
        if times is not None:
            metrics = RequestMetrics(
                arrival_time=times.arrival,
                queue_time=None if times.scheduled is None else times.scheduled - times.arrival,
                time_to_first_token=None if times.first_token is None else times.first_token - times.arrival,
                e2e_latency=None if times.finished is None else times.finished - times.arrival)
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=completions, finished=finished,
                             num_cached_tokens=request.sequences[0].num_cached_prompt_tokens, metrics=metrics)

    # ----- introspection ---------------------------------------------------------------
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
            "kv_cache_bytes": self.cache_shape.bytes_per_page * usage.num_pages_total,
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
