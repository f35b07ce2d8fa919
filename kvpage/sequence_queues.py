"""The scheduler's book of requests and sequences, and what changes it outside planning (pure Python).

Every unfinished sequence is in exactly one queue: *waiting* (to be admitted,
or recomputed after a preemption), *running* (its K/V in device pages) or
*swapped* (its pages copied to host memory).  :class:`SequenceQueues` holds
the queues and everything that moves sequences through them except planning
a step: submission (with the refusal of requests that could never fit),
aborts, forking the siblings of an ``n > 1`` request, finishing, and applying
a step's results in two halves (``commit_step`` when the step is planned,
``resolve_step`` when its sampled tokens arrive).  :class:`~kvpage.scheduler.Scheduler`
adds the planning: admission, chunked prefill, preemption and swap-in.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from kvpage.admission import AdmissionController
from kvpage.batch import SampledToken, SchedulerOutput
from kvpage.beam import BeamGroup
from kvpage.beam_scheduling import advance_beams
from kvpage.config import SchedulerConfig
from kvpage.kv import ContiguousKVCacheManager, KVCacheManager, KVWaste
from kvpage.preemption import SwapCostModel
from kvpage.request import Request, Sequence, SequenceStatus
from kvpage.step_plan import running_key, waiting_key


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    num_swapped_out: int = 0  # preemptions by swap (the rest recompute)
    num_swapped_in: int = 0
    num_tokens_computed: int = 0  # every token fed through the model, recomputation included
    num_recomputed_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0


class SequenceQueues:
    """The waiting, running and swapped sequences of every unfinished request, and their lifecycle."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager | ContiguousKVCacheManager, max_model_len: int,
                 eos_token_ids: tuple[int, ...], kv_layout: str = "paged",
                 swap_cost: SwapCostModel | None = None) -> None:
        self.config = config
        self.kv = kv
        self.kv_layout = kv_layout
        self.admission = AdmissionController(config, kv, kv_layout, max_model_len)
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # preempted to host memory, resumed before any admission
        self.swap_cost = swap_cost
        self.requests: dict[str, Request] = {}
        self._beam_requests: dict[str, Request] = {}  # admitted beam searches, holding their seats
        # Every unfinished sequence by id (waiting or running).
        self.live: dict[int, Sequence] = {}
        self.counters = SchedulerCounters()
        self._next_seq_id = 0
        self._next_admit = 0
        self._finished_since_last_step: list[int] = []

    # ----- submission ---------------------------------------------------------
    def max_new_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        return self.max_model_len - num_prompt_tokens if max_tokens is None else max_tokens

    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None, n: int) -> None:
        """Refuse, with a clear error, a request that could never run to completion."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; max_model_len is {limit}, "
                             "so a prompt may have at most max_model_len - 1 tokens")
        new_tokens = self.max_new_tokens(num_prompt_tokens, max_tokens)
        if num_prompt_tokens + new_tokens > limit:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({new_tokens}) = "
                             f"{num_prompt_tokens + new_tokens} exceeds max_model_len ({limit})")
        # The last generated token is never fed back, so its K/V is never stored.
        pages = self.kv.pages_for_tokens(num_prompt_tokens + new_tokens - 1)
        if pages > self.kv.num_pages:
            raise ValueError(f"request needs {pages} KV pages (prompt {num_prompt_tokens} + max_tokens "
                             f"{new_tokens} tokens, block_size {self.kv.block_size}) but the whole cache "
                             f"has {self.kv.num_pages}; lower max_tokens or raise num_kv_blocks / kv_cache_memory")
        if n > self.config.max_num_seqs:
            raise ValueError(f"n ({n}) exceeds max_num_seqs ({self.config.max_num_seqs})")
        self.admission.check_fits(num_prompt_tokens, new_tokens, n)

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        self.check_fits(len(request.prompt_token_ids), params.max_tokens,
                        params.beam_width if params.use_beam_search else params.n)  # type: ignore[arg-type]
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        request.num_pending_forks = 0 if params.use_beam_search else params.n - 1
        if params.use_beam_search:  # beams grow by forking, step by step
            stops = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else self.eos_token_ids)
            request.beam = BeamGroup(params.beam_width, params.n, params.length_penalty,  # type: ignore[arg-type]
                                     params.early_stopping, stops, params.max_tokens)  # type: ignore[arg-type]
        seq = self.new_sequence(request, 0, list(request.prompt_token_ids))
        if request.beam is not None:
            request.beam.running = [(seq.seq_id, 0.0)]
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, seq, key=waiting_key)

    def new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(seq_id=self._next_seq_id, request=request, sample_index=index, token_ids=token_ids,
                       num_prompt_tokens=len(request.prompt_token_ids))
        self._next_seq_id += 1
        request.sequences.append(seq)
        request.num_unfinished_seqs += 1
        self.live[seq.seq_id] = seq
        return seq

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.num_pending_forks = 0
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, SequenceStatus.FINISHED_ABORTED)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def kv_waste(self) -> KVWaste:
        """The cache by kind of waste now; external fragmentation is judged against the waiting requests."""
        min_pending = None
        if self.kv_layout != "paged" and self.waiting:
            reservations = (self.admission.reservation_tokens(seq.num_prompt_tokens, self.max_new_tokens(
                seq.num_prompt_tokens, seq.request.sampling_params.max_tokens)) for seq in self.waiting)
            min_pending = min(self.kv.pages_for_tokens(r or 0) for r in reservations)
        return self.kv.waste(self.admission.reserved_pages(), min_pending)

    def _fork(self, parent: Sequence) -> None:
        """Start the siblings of a parent that has computed all its prompt but the last token."""
        request = parent.request
        for _ in range(request.num_pending_forks):
            child = self.new_sequence(request, len(request.sequences), list(parent.token_ids))
            self.kv.fork(parent.seq_id, child.seq_id)
            self.admission.on_fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
            child.status = SequenceStatus.RUNNING
            child.admit_order = self._next_admit
            self._next_admit += 1
            bisect.insort(self.running, child, key=running_key)
        request.num_pending_forks = 0

    # ----- after a step -------------------------------------------------------------------
    # A step's results are applied in two halves. ``commit_step`` runs as soon as the step is
    # planned: its K/V counts as computed and each sampling sequence has a token in flight, so the
    # next step can be planned while this one runs on the device. ``resolve_step`` runs when the
    # sampled ids arrive: it appends them and applies stop conditions. ``update`` does both at once.
    def update(self, out: SchedulerOutput, sampled: list[SampledToken]) -> list[Sequence]:
        """Apply a step's results. Returns the sequences that got a new token."""
        self.commit_step(out)
        return self.resolve_step(out, sampled)

    def commit_step(self, out: SchedulerOutput) -> None:
        """Record the planned tokens as computed; every sampling sequence gets one token in flight."""
        counters, live_seqs, commit = self.counters, self.live, self.kv.commit  # the hot loop
        for planned in out.sequences:
            seq = live_seqs.get(planned.seq_id)  # type: ignore[assignment]
            if seq is None:  # aborted during the step
                continue
            start = seq.num_computed_tokens
            num_new = len(planned.input_token_ids)
            computed = seq.num_computed_tokens = start + num_new
            counters.num_tokens_computed += num_new
            if start < seq.max_computed_tokens:  # computed before a preemption: recomputation
                counters.num_recomputed_tokens += min(computed, seq.max_computed_tokens) - start
            seq.max_computed_tokens = max(seq.max_computed_tokens, computed)
            if start < seq.num_prompt_tokens:
                counters.num_prompt_tokens_computed += min(computed, seq.num_prompt_tokens) - start
            commit(seq.seq_id, seq.token_ids, computed)
            request = seq.request
            if request.num_pending_forks and computed == seq.compute_target:
                self._fork(seq)
            if planned.sample and request.beam is None:
                seq.num_inflight_tokens += 1
                if self._reaches_length_limit(seq, len(seq.token_ids) + seq.num_inflight_tokens):
                    seq.last_token_inflight = True

    def resolve_step(self, out: SchedulerOutput, sampled: list[SampledToken]) -> list[Sequence]:
        """Append the sampled tokens of a committed step and apply stops. Returns the sequences that got one."""
        samples = iter(sampled)
        touched: list[Sequence] = []
        beam_requests: dict[str, Request] = {}
        counters, live_seqs, bs = self.counters, self.live, self.kv.block_size  # the hot loop
        for planned in out.sequences:
            if not planned.sample:
                continue
            token = next(samples)
            seq = live_seqs.get(planned.seq_id)  # type: ignore[assignment]
            if seq is None:  # aborted, or stopped by a token of the step before
                continue
            request = seq.request
            if request.beam is not None:
                request.beam.candidates[seq.seq_id] = token.beam_candidates  # type: ignore[assignment]
                beam_requests[request.request_id] = request
                continue
            seq.num_inflight_tokens -= 1
            seq.append_token(token.token_id, token.logprobs)
            if len(seq.token_ids) % bs == 0 and seq.num_computed_tokens >= len(seq.token_ids):
                # The step after computed this token's K/V before its id was known: its page is full now.
                self.kv.index_full_pages(seq.seq_id, seq.token_ids)
            counters.num_generated_tokens += 1
            touched.append(seq)
            self._check_token_stop(seq, token.token_id)
        for request in beam_requests.values():
            if request.beam is not None and request.beam.ready():
                touched += advance_beams(self, request)
        return touched

    def _check_token_stop(self, seq: Sequence, token_id: int) -> None:
        params = seq.request.sampling_params
        num_out = len(seq.token_ids) - seq.num_prompt_tokens
        if num_out >= params.min_tokens and (params.stop_token_ids or not params.ignore_eos):
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self._finish(seq, SequenceStatus.FINISHED_STOPPED)
                return
            if token_id in params.stop_token_ids:  # type: ignore[operator]
                seq.stop_reason = token_id
                self._finish(seq, SequenceStatus.FINISHED_STOPPED)
                return
        if self._reaches_length_limit(seq, len(seq.token_ids)):
            self._finish(seq, SequenceStatus.FINISHED_LENGTH)

    def _reaches_length_limit(self, seq: Sequence, length: int) -> bool:
        """Whether a sequence of ``length`` tokens has generated all it may (max_tokens, max_model_len)."""
        max_tokens = seq.request.sampling_params.max_tokens
        max_out = self.max_model_len - seq.num_prompt_tokens if max_tokens is None else max_tokens
        return length - seq.num_prompt_tokens >= max_out or length >= self.max_model_len

    def finish_sequence(self, seq: Sequence, status: SequenceStatus, stop_reason: int | str | None = None) -> None:
        """End a sequence early (the engine calls this when a stop string matches)."""
        if not seq.is_finished:
            seq.stop_reason = stop_reason
            self._finish(seq, status)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        self.kv.free(seq.seq_id)
        self.admission.on_release(seq)
        self.live.pop(seq.seq_id, None)
        seq.status = status
        seq.request.num_unfinished_seqs -= 1
        self._finished_since_last_step.append(seq.seq_id)
        if seq.request.is_finished:
            self.requests.pop(seq.request.request_id, None)
            self._beam_requests.pop(seq.request.request_id, None)
            self.admission.on_request_done(seq.request)
