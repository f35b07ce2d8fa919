"""Iteration-level continuous batching over the paged KV cache (pure Python).

Each call to :meth:`Scheduler.schedule` plans one model step under two
budgets: ``max_num_batched_tokens`` tokens and ``max_num_seqs`` running
sequences. Running sequences go first, in priority then admission order:
each gets its next decode token or its next prefill chunk. Waiting sequences
are then admitted in priority then arrival order while budget and pages last,
starting from their longest cached prefix. Prefill is chunked, so a long
prompt shares steps with decodes instead of stalling them.

When the pool cannot supply a running sequence's next page, the scheduler
preempts the running sequence with the lowest priority that was admitted
last: its pages are freed and it returns to the waiting queue, ahead of later
arrivals, to be recomputed (its full pages usually survive in the prefix
cache). A request that could never fit, even alone, is refused at submission.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from kvpage.admission import AdmissionController
from kvpage.beam import BeamGroup
from kvpage.batch import SampledToken, ScheduledSequence, SchedulerOutput
from kvpage.config import SchedulerConfig
from kvpage.kv import ContiguousKVCacheManager, KVCacheManager, KVWaste
from kvpage.preemption import SwapCostModel
from kvpage.request import Request, Sequence, SequenceStatus


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    num_swapped_out: int = 0  # preemptions by swap (the rest recompute)
    num_swapped_in: int = 0
    num_tokens_computed: int = 0  # every token fed through the model, recomputation included
    num_recomputed_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0


@dataclass
class _StepPlan:
    """The step being planned: sequences, their page copies, the token budget left."""

    budget: int
    planned: dict[int, ScheduledSequence] = field(default_factory=dict)
    copies: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    preempted: list[int] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    def add(self, seq: ScheduledSequence, copies: list[tuple[int, int]]) -> None:
        self.planned[seq.seq_id] = seq
        if copies:
            self.copies[seq.seq_id] = copies
        self.budget -= len(seq.input_token_ids)

    def withdraw(self, seq_id: int) -> None:
        seq = self.planned.pop(seq_id, None)
        if seq is not None:
            self.budget += len(seq.input_token_ids)
            self.copies.pop(seq_id, None)

    def output(self, finished_seq_ids: list[int]) -> SchedulerOutput:
        return SchedulerOutput(
            sequences=list(self.planned.values()),
            page_copies=[c for copies in self.copies.values() for c in copies],
            preempted_seq_ids=self.preempted,
            finished_seq_ids=finished_seq_ids,
            swap_out=self.swap_out,
            swap_in=self.swap_in,
        )


def _waiting_key(seq: Sequence) -> tuple[int, float, int]:
    return (seq.request.priority, seq.request.arrival_time, seq.seq_id)


def _running_key(seq: Sequence) -> tuple[int, int]:
    return (seq.request.priority, seq.admit_order)


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
        seq = self._new_sequence(request, 0, list(request.prompt_token_ids))
        if request.beam is not None:
            request.beam.running = [(seq.seq_id, 0.0)]
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, seq, key=_waiting_key)

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
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
        self.admission.forget(request_id)
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
        step = _StepPlan(budget=self.config.max_num_batched_tokens)
        i = 0
        while i < len(self.running) and step.budget > 0:
            seq = self.running[i]
            num_new = min(seq.compute_target - seq.num_computed_tokens, step.budget)
            if num_new <= 0:
                i += 1
                continue
            copies = self.kv.allocate(seq.seq_id, num_new)
            while copies is None:
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    break
                copies = self.kv.allocate(seq.seq_id, num_new)
            if copies is None:
                break
            step.add(self._plan(seq, num_new), copies)
            i += 1
        # Admitting (or resuming) while evicting running work would only thrash.
        if not step.preempted:
            self._swap_in(step)
            if not self.swapped:
                self._admit(step)
        out = step.output(self._finished_since_last_step)
        self._finished_since_last_step = []
        return out

    def _admit(self, step: _StepPlan) -> None:
        admission = self.admission
        while self.waiting and step.budget > 0:
            seq = self.waiting[0]
            request = seq.request
            group = 1 + request.num_pending_forks
            while len(self.running) + group > self.config.max_num_seqs:
                if not self._preempt_lower_priority(request.priority, step):
                    admission.delay(seq, "max_num_seqs")
                    return
            max_new = self.max_new_tokens(seq.num_prompt_tokens, request.sampling_params.max_tokens)
            hit = self.kv.find_cached_prefix(seq.token_ids)
            num_new = min(seq.compute_target - hit.num_tokens, step.budget)
            if admission.blocking_rule(seq, hit, num_new, max_new, len(self.running)) is not None:
                return
            reserve = admission.reservation_tokens(seq.num_prompt_tokens, max_new)
            copies = self.kv.allocate(seq.seq_id, num_new, hit, reserve_tokens=reserve, reserve_count=group)
            while copies is None and (self._preempt_lower_priority(request.priority, step) or self._preempt_idle(step)):
                num_new = min(seq.compute_target - hit.num_tokens, step.budget)
                copies = self.kv.allocate(seq.seq_id, num_new, hit, reserve_tokens=reserve, reserve_count=group)
            if copies is None:
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
            seq.admit_order = self._next_admit
            self._next_admit += 1
            bisect.insort(self.running, seq, key=_running_key)
            if num_new > 0:
                step.add(self._plan(seq, num_new), copies)
            else:
                self._fork(seq)

    def _preempt_lower_priority(self, priority: int, step: _StepPlan) -> bool:
        """Make room for a waiting request by preempting a running one of strictly lower priority."""
        if not self.running or self.running[-1].request.priority <= priority:
            return False
        self._preempt(self.running[-1], step)
        return True

    def _preempt_idle(self, step: _StepPlan) -> bool:
        """Free the pages of a running beam that only waits for its siblings' candidates.

        Without this, beams holding pages while they wait could starve the
        sibling they wait for.
        """
        for seq in reversed(self.running):
            if seq.request.beam is not None and seq.num_computed_tokens >= seq.compute_target:
                self._preempt(seq, step)
                return True
        return False

    def _plan(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(
            seq_id=seq.seq_id,
            input_token_ids=seq.token_ids[start : start + num_new],
            start_position=start,
            page_ids=self.kv.page_ids(seq.seq_id),
            sample=start + num_new == seq.num_tokens,
            sampling_params=seq.request.sampling_params,
            sample_index=seq.sample_index,
            all_token_ids=seq.token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
        )

    def _preempt(self, seq: Sequence, step: _StepPlan) -> None:
        # A beam keeps its next-token candidates: they depend on its tokens, not on where its K/V is.
        step.withdraw(seq.seq_id)  # it may already be planned in this step (priority preemption)
        step.preempted.append(seq.seq_id)
        self.running.remove(seq)
        self.counters.num_preemptions += 1
        if self._should_swap(seq):
            copies = self.kv.swap_out(seq.seq_id)  # type: ignore[union-attr]
            if copies is not None:
                step.swap_out.extend(copies)
                seq.status = SequenceStatus.SWAPPED
                self.counters.num_swapped_out += 1
                bisect.insort(self.swapped, seq, key=_running_key)
                return
        self.kv.free(seq.seq_id)
        self.admission.on_release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_waiting_key)

    def _should_swap(self, seq: Sequence) -> bool:
        mode = self.config.preemption_mode
        if mode == "recompute" or not isinstance(self.kv, KVCacheManager) or seq.num_computed_tokens == 0:
            return False
        if mode == "swap" or self.swap_cost is None:
            return True
        return self.swap_cost.prefer_swap(seq.num_computed_tokens,
                                          self.kv.pages_for_tokens(seq.num_computed_tokens))

    def _swap_in(self, step: _StepPlan) -> None:
        """Resume swapped-out sequences, oldest admitted first, while pages and batch room last."""
        while self.swapped and len(self.running) < self.config.max_num_seqs:
            seq = self.swapped[0]
            copies = self.kv.swap_in(seq.seq_id)  # type: ignore[union-attr]
            if copies is None:
                return
            self.swapped.pop(0)
            step.swap_in.extend(copies)
            seq.status = SequenceStatus.RUNNING
            self.counters.num_swapped_in += 1
            bisect.insort(self.running, seq, key=_running_key)
            num_new = min(seq.compute_target - seq.num_computed_tokens, step.budget)
            if num_new > 0:
                page_copies = self.kv.allocate(seq.seq_id, num_new)
                if page_copies is not None:
                    step.add(self._plan(seq, num_new), page_copies)

    def _fork(self, parent: Sequence) -> None:
        """Start the siblings of a parent that has computed all its prompt but the last token."""
        request = parent.request
        for _ in range(request.num_pending_forks):
            child = self._new_sequence(request, len(request.sequences), list(parent.token_ids))
            self.kv.fork(parent.seq_id, child.seq_id)
            self.admission.on_fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
            child.status = SequenceStatus.RUNNING
            child.admit_order = self._next_admit
            self._next_admit += 1
            bisect.insort(self.running, child, key=_running_key)
        request.num_pending_forks = 0

    # ----- after a step -------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: list[SampledToken]) -> list[Sequence]:
        """Apply a step's results. Returns the sequences that got a new token."""
        samples = iter(sampled)
        touched: list[Sequence] = []
        beam_requests: dict[str, Request] = {}
        for planned in out.sequences:
            live = self.live.get(planned.seq_id)
            if live is None:  # aborted during the step
                if planned.sample:
                    next(samples)
                continue
            seq = live
            start = seq.num_computed_tokens
            seq.num_computed_tokens += len(planned.input_token_ids)
            self.counters.num_tokens_computed += len(planned.input_token_ids)
            if start < seq.max_computed_tokens:  # computed before a preemption: recomputation
                self.counters.num_recomputed_tokens += min(seq.num_computed_tokens, seq.max_computed_tokens) - start
            if seq.num_computed_tokens > seq.max_computed_tokens:
                seq.max_computed_tokens = seq.num_computed_tokens
            if start < seq.num_prompt_tokens:
                self.counters.num_prompt_tokens_computed += min(seq.num_computed_tokens, seq.num_prompt_tokens) - start
            self.kv.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.request.num_pending_forks and seq.num_computed_tokens == seq.compute_target:
                self._fork(seq)
            if not planned.sample:
                continue
            token = next(samples)
            if seq.request.beam is not None:
                seq.request.beam.candidates[seq.seq_id] = token.beam_candidates  # type: ignore[assignment]
                beam_requests[seq.request.request_id] = seq.request
                continue
            seq.append_token(token.token_id, token.logprobs)
            self.counters.num_generated_tokens += 1
            touched.append(seq)
            self._check_token_stop(seq, token.token_id)
        for request in beam_requests.values():
            if request.beam is not None and request.beam.ready():
                touched += advance_beams(self, request)
        return touched

    def _check_token_stop(self, seq: Sequence, token_id: int) -> None:
        params = seq.request.sampling_params
        num_out = seq.num_output_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self._finish(seq, SequenceStatus.FINISHED_STOPPED)
                return
            if token_id in params.stop_token_ids:  # type: ignore[operator]
                seq.stop_reason = token_id
                self._finish(seq, SequenceStatus.FINISHED_STOPPED)
                return
        if num_out >= self.max_new_tokens(seq.num_prompt_tokens, params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            self._finish(seq, SequenceStatus.FINISHED_LENGTH)

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


def advance_beams(sched: Scheduler, request: Request) -> list[Sequence]:
    """One beam step: fork the beams chosen twice, extend the chosen, free the rest.

    Returns a sequence of the request when the search is over (so that its
    output is reported), else nothing: beams report only their final result.
    """
    group = request.beam
    assert group is not None
    beams = {seq_id: sched.live[seq_id] for seq_id, _ in group.running}
    choices = group.step({seq_id: seq.output_token_ids for seq_id, seq in beams.items()})
    sched.counters.num_generated_tokens += len(choices)
    if group.done:
        for seq in beams.values():
            sched.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED)
        return [next(iter(beams.values()))]
    extended: list[tuple[Sequence, int]] = []
    running = []
    for choice in choices:
        parent = beams[choice.parent_seq_id]
        if all(p is not parent for p, _ in extended):
            extended.append((parent, choice.token_id))
            running.append((parent.seq_id, choice.score))
            continue
        child = sched._new_sequence(request, len(request.sequences), list(parent.token_ids))
        child.append_token(choice.token_id, None)
        if parent.status is SequenceStatus.RUNNING:
            sched.kv.fork(parent.seq_id, child.seq_id)  # shares every page; the last one copy-on-write
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
            child.admit_order = parent.admit_order
            bisect.insort(sched.running, child, key=_running_key)
        else:  # the parent was preempted after giving its candidates: the child waits and recomputes too
            bisect.insort(sched.waiting, child, key=_waiting_key)
        running.append((child.seq_id, choice.score))
    for parent, token_id in extended:
        parent.append_token(token_id, None)
    kept = {p.seq_id for p, _ in extended}
    for seq_id, seq in beams.items():
        if seq_id not in kept:
            sched.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)  # pruned: its pages go back
    group.running = running
    return []
