"""Iteration-level continuous batching over the paged KV cache (pure Python).

Each call to :meth:`Scheduler.schedule` schedules one model step under two
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

from kvpage.config import GIB, CacheConfig, SchedulerConfig
from kvpage.kv import KVManager, KVWaste, PrefixHit, make_kv_manager
from kvpage.sched.admission import AdmissionController, group_size
from kvpage.sched.draft import StepDraft
from kvpage.sched.lifecycle import Lifecycle, SchedulerCounters
from kvpage.sched.limits import LengthLimit
from kvpage.sched.preemption import SwapPreference, choose_victim, is_parked, ranks_before
from kvpage.sched.prompt_logprobs import positions_to_score, reads_prefix_cache
from kvpage.sched.queues import SequenceQueues
from kvpage.sched.results import StepResults
from kvpage.sched.sequence import Request, Sequence, SequenceStatus
from kvpage.step_io import INFLIGHT_TOKEN, PageOpKind, SampledToken, ScheduledSequence, SchedulerOutput

__all__ = ["Scheduler", "SchedulerCounters", "num_swap_pages"]


def num_swap_pages(cache: CacheConfig, config: SchedulerConfig, bytes_per_page: int) -> int:
    """Host pages of swap space: ``swap_space`` GiB, when preemption may swap and the layout is paged."""
    if config.preemption_mode == "recompute" or cache.kv_layout != "paged":
        return 0
    return int(cache.swap_space * GIB) // bytes_per_page


class Scheduler:
    """Decides, step by step, which sequences run and how many tokens each computes.

    It is composed of a :class:`~kvpage.sched.lifecycle.Lifecycle` (the
    sequences and what happens to them) and :class:`~kvpage.sched.results.StepResults`
    (applying a step's results); this class adds the scheduling of a step.
    """

    def __init__(self, config: SchedulerConfig, kv: KVManager, max_model_len: int, eos_token_ids: tuple[int, ...],
                 swap_cost: SwapPreference | None = None) -> None:
        self.config = config
        self.kv = kv
        self.life = Lifecycle(config, kv, LengthLimit(max_model_len), eos_token_ids, swap_cost)
        self.results = StepResults(self.life)

    @classmethod
    def from_config(cls, cache: CacheConfig, config: SchedulerConfig, num_pages: int, bytes_per_page: int,
                    max_model_len: int, eos_token_ids: tuple[int, ...],
                    swap_cost: SwapPreference | None = None) -> Scheduler:
        """The scheduler and KV manager the engine and the planner build from the same configuration."""
        kv = make_kv_manager(cache.kv_layout, num_pages, cache.block_size, max_model_len,
                             enable_prefix_caching=cache.enable_prefix_caching,
                             prefix_hash=cache.prefix_caching_hash_algo,
                             num_swap_pages=num_swap_pages(cache, config, bytes_per_page))
        return cls(config, kv, max_model_len, eos_token_ids, swap_cost)

    # ----- the book of sequences (read it; the lifecycle writes it) ---------------------
    @property
    def queues(self) -> SequenceQueues:
        return self.life.queues

    @property
    def waiting(self) -> list[Sequence]:
        return self.life.queues.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.life.queues.running

    @property
    def swapped(self) -> list[Sequence]:
        return self.life.queues.swapped

    @property
    def requests(self) -> dict[str, Request]:
        return self.life.queues.requests

    @property
    def live(self) -> dict[int, Sequence]:
        return self.life.queues.live

    @property
    def counters(self) -> SchedulerCounters:
        return self.life.counters

    @property
    def admission(self) -> AdmissionController:
        return self.life.admission

    @property
    def max_model_len(self) -> int:
        return self.life.limit.max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.life.eos_token_ids

    @property
    def swap_cost(self) -> SwapPreference | None:
        return self.life.swap_cost

    @swap_cost.setter
    def swap_cost(self, cost: SwapPreference | None) -> None:
        self.life.swap_cost = cost

    def has_unfinished(self) -> bool:
        return self.life.queues.has_unfinished()

    def kv_waste(self) -> KVWaste:
        return self.life.kv_waste()

    # ----- requests in, results back -----------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.life.submit(request)

    def abort_request(self, request_id: str) -> Request | None:
        return self.life.abort(request_id)

    def update(self, out: SchedulerOutput, sampled: list[SampledToken]) -> list[Sequence]:
        """Apply a step's results at once (the synchronous order). Returns the sequences that got a token."""
        self.results.commit(out)
        return self.results.resolve(out, sampled)

    def commit_step(self, out: SchedulerOutput) -> None:
        self.results.commit(out)

    def resolve_step(self, out: SchedulerOutput, sampled: list[SampledToken]) -> list[Sequence]:
        return self.results.resolve(out, sampled)

    # ----- scheduling a step -----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = StepDraft(budget=self.config.max_num_batched_tokens)
        running, allocate, scheduled, add = self.running, self.kv.allocate, self._scheduled, step.add  # hot loop
        i = 0
        while i < len(running) and step.budget > 0:
            seq = running[i]
            num_new = min(seq.compute_target - seq.num_computed_tokens, step.budget)
            if num_new <= 0:
                i += 1
                continue
            copies = allocate(seq.seq_id, num_new)
            while copies is None:
                victim = choose_victim(running)
                self._preempt(victim, step, f"pages for seq {seq.seq_id}'s next tokens")
                if victim is seq:
                    break
                copies = allocate(seq.seq_id, num_new)
            if copies is None:
                break
            add(scheduled(seq, num_new), copies)
            i += 1
        # Admitting (or resuming) while evicting running work would only thrash.
        if not step.preempted:
            self._admit(step, ahead_of=self._swap_in(step))
        return step.output(self.life.take_finished())

    def schedule_after_decodes(self, num_decodes: int) -> SchedulerOutput:
        """What :meth:`schedule` adds after its running loop, for a step whose loop the caller has done.

        The caller (the planner's decode fast-forward) has given each of the
        ``num_decodes`` running sequences its next decode token and page, as
        the loop would have without preempting.  This resumes and admits
        with the budget left, and returns only those sequences.
        """
        step = StepDraft(budget=self.config.max_num_batched_tokens - num_decodes)
        self._admit(step, ahead_of=self._swap_in(step))
        return step.output(self.life.take_finished())

    def _admit(self, step: StepDraft, ahead_of: Sequence | None) -> None:
        """Admit waiting sequences in queue order while budget, rules and pages allow.

        While ``ahead_of`` (a swapped-out sequence) cannot resume, only
        preempted beams of requests that rank before it may come back.
        """
        admission, life = self.admission, self.life
        while step.budget > 0:
            seq = next((s for s in self.waiting if not is_parked(s)
                        and (ahead_of is None or ranks_before(s.request, ahead_of.request))), None)
            if seq is None:
                return
            group = group_size(seq)
            while self._num_seats_taken() + (0 if self._has_seat(seq) else group) > self.config.max_num_seqs:
                if not self._make_room(seq, step):
                    admission.delay(seq, "max_num_seqs")
                    return
            max_new = life.limit.max_new_tokens(seq.num_prompt_tokens, seq.request.sampling_params.max_tokens)
            while True:
                hit = self.kv.find_cached_prefix(seq.token_ids) if reads_prefix_cache(seq) else PrefixHit()
                num_new = min(seq.compute_target - hit.num_tokens, step.budget)
                claim = admission.claim(seq, hit, max_new)
                blocked = admission.blocking_rule(seq, claim, num_new, len(self.running))
                copies = None if blocked else self.kv.allocate(seq.seq_id, num_new, claim)
                if copies is not None:
                    break
                if not self._make_room(seq, step):
                    if blocked is None:
                        admission.delay(seq, "pages")
                    return
            life.admit(seq, hit, max_new, num_new)
            if num_new > 0:
                step.add(self._scheduled(seq, num_new), copies)
            else:
                life.fork_samples(seq)

    def _num_seats_taken(self) -> int:
        """Running sequences, plus the seats under ``max_num_seqs`` kept for beams not running now.

        An admitted beam search holds ``beam_width`` seats until it ends, so
        its beams can always fork and come back.
        """
        taken = len(self.running)
        live = self.live
        for request in self.life.beam_requests.values():
            beam = request.beam
            if beam is not None:
                taken += beam.width - sum(live[seq_id].status is SequenceStatus.RUNNING
                                          for seq_id, _ in beam.running if seq_id in live)
        return taken

    def _has_seat(self, seq: Sequence) -> bool:
        return seq.request.request_id in self.life.beam_requests

    def _make_room(self, seq: Sequence, step: StepDraft) -> bool:
        """Preempt one running sequence so that ``seq`` can be admitted or resumed; False if none may yield.

        Any request may displace one of strictly lower priority.  A beam
        search request also displaces its own parked beams, and, once admitted,
        requests admitted after it: its beams advance only together, so
        without this rule two beam requests could take each other's pages
        forever, or park holding the pages their last beam needs.
        """
        request = seq.request
        if self.running:
            victim = choose_victim(self.running)
            other = victim.request
            if victim.seq_id in step.resumed:
                return False
            if other is not request and (other.priority > request.priority
                                         or (request.beam is not None and ranks_before(request, other))):
                why = "a higher priority" if other.priority > request.priority else "an older beam search"
                self._preempt(victim, step, f"admission of {why}: request {request.request_id}")
                return True
        if request.beam is not None:
            for other_seq in reversed(self.running):
                if other_seq.request is request and is_parked(other_seq) and other_seq.seq_id not in step.resumed:
                    self._preempt(other_seq, step, f"beam search {request.request_id}: a parked beam yields")
                    return True
        return False

    def _scheduled(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        tokens = seq.token_ids
        end = start + num_new
        inputs = tokens[start:end]
        if end > len(tokens):  # the last input is the token the running step is sampling
            inputs.append(INFLIGHT_TOKEN)
        params = seq.request.sampling_params
        # Positional: this runs for every sequence of every step. Fields, in order: seq_id,
        # input_token_ids, start_position, page_ids, sample, sampling_params, sample_index,
        # all_token_ids, num_prompt_tokens.
        scheduled = ScheduledSequence(seq.seq_id, inputs, start, self.kv.page_ids(seq.seq_id),
                                      end == len(tokens) + seq.num_inflight_tokens, params,
                                      seq.sample_index, tokens, seq.num_prompt_tokens)
        if params.prompt_logprobs is not None:
            scheduled.prompt_logprob_positions = positions_to_score(seq, start, end)
        return scheduled

    def _preempt(self, seq: Sequence, step: StepDraft, reason: str) -> None:
        # A beam keeps its next-token candidates: they depend on its tokens, not on where its K/V is.
        step.withdraw(seq.seq_id)  # it may already be scheduled in this step (priority preemption)
        step.preempted.append(seq.seq_id)
        copies = self.life.preempt(seq, reason)
        if copies is not None:
            step.log(PageOpKind.SWAP_OUT, copies)

    def _swap_in(self, step: StepDraft) -> Sequence | None:
        """Resume swapped-out sequences, oldest admitted first, while pages and batch room last.

        A sequence comes back only with room for its next tokens too, and not
        ahead of a preempted beam of an older request waiting to recompute.
        Returns the first one that must stay out, if any.
        """
        kv = self.kv
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
            step.log(PageOpKind.SWAP_IN, self.life.swap_in(seq))
            step.resumed.add(seq.seq_id)
            if num_new > 0:
                page_copies = kv.allocate(seq.seq_id, num_new)
                if page_copies is None:
                    raise RuntimeError(f"sequence {seq.seq_id} was swapped in without room for its next tokens")
                step.add(self._scheduled(seq, num_new), page_copies)
