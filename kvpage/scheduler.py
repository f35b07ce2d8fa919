"""Iteration-level continuous batching over the paged KV cache (pure Python).

Each call to :meth:`Scheduler.schedule` plans one model step under two
budgets: ``max_num_batched_tokens`` tokens and ``max_num_seqs`` running
sequences. Running sequences go first, in priority then admission order:
each gets its next decode token or its next prefill chunk. Waiting sequences
are then admitted in priority then arrival order while budget and pages last,
starting from their longest cached prefix. Prefill is chunked, so a long
prompt shares steps with decodes instead of stalling them.

When the pool cannot supply a running sequence's next page, the scheduler
preempts the running sequence of the lowest priority whose request was
admitted last.  Its pages are swapped to host memory (``preemption_mode``
``swap``, or ``auto`` when the cost model says so) or freed, and then it
waits, ahead of later arrivals, to be recomputed (its full pages usually
survive in the prefix cache).  Requests keep their first admission rank
through preemptions, so the oldest is never the victim of a younger one and
always progresses.  A request that could never fit, even alone, is refused
at submission.

Beam search couples sequences: a search advances only when every beam has
given its next-token candidates.  A beam that has given them is *parked*:
it is the first to yield pages within its request and is not resumed until
its group advances.  An admitted search holds ``beam_width`` seats under
``max_num_seqs`` and may reclaim pages from requests admitted after it, so
no set of searches can starve each other of the pages they wait for.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from kvpage.admission import AdmissionController, group_size
from kvpage.batch import INFLIGHT_TOKEN, SampledToken, ScheduledSequence, SchedulerOutput
from kvpage.beam import BeamGroup
from kvpage.beam_scheduling import advance_beams
from kvpage.config import SchedulerConfig
from kvpage.kv import ContiguousKVCacheManager, KVCacheManager, KVWaste
from kvpage.preemption import SwapCostModel
from kvpage.request import Request, Sequence, SequenceStatus
from kvpage.step_plan import StepPlan, is_parked, ranks_before, running_key, waiting_key


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    num_swapped_out: int = 0  # preemptions by swap (the rest recompute)
    num_swapped_in: int = 0
    num_tokens_computed: int = 0  # every token fed through the model, recomputation included
    num_recomputed_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0


class Scheduler:
    """Decides, step by step, which sequences run and how many tokens each computes."""

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

    # ----- planning a step -----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = StepPlan(budget=self.config.max_num_batched_tokens)
        running, allocate, plan, add = self.running, self.kv.allocate, self._plan, step.add  # the hot loop
        i = 0
        while i < len(running) and step.budget > 0:
            seq = running[i]
            num_new = min(seq.compute_target - seq.num_computed_tokens, step.budget)
            if num_new <= 0:
                i += 1
                continue
            copies = allocate(seq.seq_id, num_new)
            while copies is None:
                victim = self._victim()
                self._preempt(victim, step)
                if victim is seq:
                    break
                copies = allocate(seq.seq_id, num_new)
            if copies is None:
                break
            add(plan(seq, num_new), copies)
            i += 1
        # Admitting (or resuming) while evicting running work would only thrash.
        if not step.preempted:
            self._admit(step, ahead_of=self._swap_in(step))
        out = step.output(self._finished_since_last_step)
        self._finished_since_last_step = []
        return out

    def _admit(self, step: StepPlan, ahead_of: Sequence | None) -> None:
        """Admit waiting sequences in queue order while budget, rules and pages allow.

        While ``ahead_of`` (a swapped-out sequence) cannot resume, only
        preempted beams of requests that rank before it may come back.
        """
        admission = self.admission
        while step.budget > 0:
            seq = next((s for s in self.waiting if not is_parked(s)
                        and (ahead_of is None or ranks_before(s.request, ahead_of.request))), None)
            if seq is None:
                return
            request = seq.request
            group = group_size(seq)
            while self._num_seats_taken() + (0 if self._has_seat(seq) else group) > self.config.max_num_seqs:
                if not self._make_room(seq, step):
                    admission.delay(seq, "max_num_seqs")
                    return
            max_new = self.max_new_tokens(seq.num_prompt_tokens, request.sampling_params.max_tokens)
            reserve = admission.reservation_tokens(seq.num_prompt_tokens, max_new)
            while True:
                hit = self.kv.find_cached_prefix(seq.token_ids)
                num_new = min(seq.compute_target - hit.num_tokens, step.budget)
                blocked = admission.blocking_rule(seq, hit, num_new, max_new, len(self.running))
                copies = None if blocked else self.kv.allocate(seq.seq_id, num_new, hit, reserve_tokens=reserve,
                                                              reserve_count=group)
                if copies is not None:
                    break
                if not self._make_room(seq, step):
                    if blocked is None:
                        admission.delay(seq, "pages")
                    return
            admission.on_admit(seq, max_new)
            self.waiting.remove(seq)  # not pop(0): a victim preempted just now may sort ahead of it
            self.kv.record_prefix_query(seq.num_tokens, hit.num_tokens)
            seq.num_computed_tokens = hit.num_tokens
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = hit.num_tokens
            seq.status = SequenceStatus.RUNNING
            if request.times is not None and request.times.scheduled is None:
                request.times.scheduled = time.monotonic()
            if request.admit_rank is None:
                request.admit_rank = self._next_admit
                if request.beam is not None:
                    self._beam_requests[request.request_id] = request
            seq.admit_order = self._next_admit
            self._next_admit += 1
            bisect.insort(self.running, seq, key=running_key)
            if num_new > 0:
                step.add(self._plan(seq, num_new), copies)
            else:
                self._fork(seq)

    def _num_seats_taken(self) -> int:
        """Running sequences, plus the seats under ``max_num_seqs`` kept for beams not running now.

        An admitted beam search holds ``beam_width`` seats until it ends, so
        its beams can always fork and come back.
        """
        taken = len(self.running)
        for request in self._beam_requests.values():
            beam = request.beam
            assert beam is not None
            taken += beam.width - sum(self.live[seq_id].status is SequenceStatus.RUNNING
                                      for seq_id, _ in beam.running if seq_id in self.live)
        return taken

    def _has_seat(self, seq: Sequence) -> bool:
        return seq.request.request_id in self._beam_requests

    def _victim(self) -> Sequence:
        """The running sequence to preempt next: from the request that ranks last, a parked beam if it has one."""
        last = self.running[-1]
        if last.request.beam is not None:
            for seq in reversed(self.running):
                if seq.request is not last.request:
                    break
                if is_parked(seq):
                    return seq
        return last

    def _make_room(self, seq: Sequence, step: StepPlan) -> bool:
        """Preempt one running sequence so that ``seq`` can be admitted or resumed; False if none may yield.

        Any request may displace one of strictly lower priority.  A beam
        search request also displaces its own parked beams, and, once admitted,
        requests admitted after it: its beams advance only together, so
        without this rule two beam requests could take each other's pages
        forever, or park holding the pages their last beam needs.
        """
        request = seq.request
        if self.running:
            victim = self._victim()
            other = victim.request
            if victim.seq_id in step.resumed:
                return False
            if other is not request and (other.priority > request.priority
                                         or (request.beam is not None and ranks_before(request, other))):
                self._preempt(victim, step)
                return True
        if request.beam is not None:
            for other_seq in reversed(self.running):
                if other_seq.request is request and is_parked(other_seq) and other_seq.seq_id not in step.resumed:
                    self._preempt(other_seq, step)
                    return True
        return False

    def _plan(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        tokens = seq.token_ids
        end = start + num_new
        inputs = tokens[start:end]
        if end > len(tokens):  # the last input is the token the running step is sampling
            inputs.append(INFLIGHT_TOKEN)
        # Positional: this runs for every sequence of every step. Fields, in order: seq_id,
        # input_token_ids, start_position, page_ids, sample, sampling_params, sample_index,
        # all_token_ids, num_prompt_tokens.
        return ScheduledSequence(seq.seq_id, inputs, start, self.kv.page_ids(seq.seq_id),
                                 end == len(tokens) + seq.num_inflight_tokens, seq.request.sampling_params,
                                 seq.sample_index, tokens, seq.num_prompt_tokens)

    def _preempt(self, seq: Sequence, step: StepPlan) -> None:
        # A beam keeps its next-token candidates: they depend on its tokens, not on where its K/V is.
        step.withdraw(seq.seq_id)  # it may already be planned in this step (priority preemption)
        step.preempted.append(seq.seq_id)
        self.running.remove(seq)
        self.counters.num_preemptions += 1
        if self._should_swap(seq):
            copies = self.kv.swap_out(seq.seq_id)  # type: ignore[union-attr]
            if copies is not None:
                step.log("swap_out", copies)
                seq.status = SequenceStatus.SWAPPED
                self.counters.num_swapped_out += 1
                bisect.insort(self.swapped, seq, key=running_key)
                return
        self.kv.free(seq.seq_id)
        self.admission.on_release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=waiting_key)

    def _should_swap(self, seq: Sequence) -> bool:
        mode = self.config.preemption_mode
        if mode == "recompute" or not isinstance(self.kv, KVCacheManager) or seq.num_computed_tokens == 0:
            return False
        if mode == "swap" or self.swap_cost is None:
            return True
        return self.swap_cost.prefer_swap(seq.num_computed_tokens,
                                          self.kv.pages_for_tokens(seq.num_computed_tokens))

    def _swap_in(self, step: StepPlan) -> Sequence | None:
        """Resume swapped-out sequences, oldest admitted first, while pages and batch room last.

        A sequence comes back only with room for its next tokens too, and not
        ahead of a preempted beam of an older request waiting to recompute.
        Returns the first one that must stay out, if any.
        """
        kv = self.kv
        assert isinstance(kv, KVCacheManager) or not self.swapped
        while True:
            seq = next((s for s in self.swapped if not is_parked(s)), None)
            if seq is None or (not self._has_seat(seq) and self._num_seats_taken() >= self.config.max_num_seqs) or any(
                    not is_parked(w) and ranks_before(w.request, seq.request) for w in self.waiting):
                return seq
            num_new = min(seq.compute_target - seq.num_computed_tokens, step.budget)
            computed = seq.num_computed_tokens
            wanted = kv.swapped_pages(seq.seq_id) + kv.pages_for_tokens(computed + num_new) \
                - kv.pages_for_tokens(computed)
            while wanted > kv.num_available_pages and seq.request.beam is not None and self._make_room(seq, step):
                pass
            if wanted > kv.num_available_pages:
                return seq
            copies = kv.swap_in(seq.seq_id)
            assert copies is not None
            self.swapped.remove(seq)
            step.log("swap_in", copies)
            step.resumed.add(seq.seq_id)
            seq.status = SequenceStatus.RUNNING
            self.counters.num_swapped_in += 1
            bisect.insort(self.running, seq, key=running_key)
            if num_new > 0:
                page_copies = kv.allocate(seq.seq_id, num_new)
                assert page_copies is not None
                step.add(self._plan(seq, num_new), page_copies)

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
