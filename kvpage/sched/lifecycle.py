"""What happens to a sequence, and what it costs in pages, promises and counters (pure Python).

:class:`Lifecycle` performs every event of a request's life: submission
(refusing what could never fit), admission, the fork of ``n > 1`` samples
and of beams, preemption (swap out or free for recompute), swap-in,
finishing and aborting.  Each event changes the sequence's status through
:meth:`~kvpage.sched.queues.SequenceQueues.move` and does what goes with
it: pages taken or freed (:mod:`kvpage.kv`), promises kept or dropped
(:mod:`kvpage.sched.admission`), counters.  Planning a step
(:mod:`kvpage.sched.scheduler`) and applying its results
(:mod:`kvpage.sched.results`) decide *when*; this module is *how*.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from kvpage.config import SchedulerConfig
from kvpage.kv import KVManager, KVWaste, PageCopy, PrefixHit
from kvpage.sampling_params import SamplingParams
from kvpage.sched.admission import AdmissionController
from kvpage.sched.beam import BeamGroup
from kvpage.sched.events import EventLog
from kvpage.sched.limits import LengthLimit
from kvpage.sched.preemption import SwapPreference, should_swap
from kvpage.sched.prompt_logprobs import reads_prefix_cache
from kvpage.sched.queues import SequenceQueues
from kvpage.sched.sequence import Request, Sequence, SequenceStatus


def num_sequences(params: SamplingParams) -> int:
    """Sequences a request runs at once: its beams, or its ``n`` samples."""
    if params.use_beam_search and params.beam_width is not None:
        return params.beam_width
    return params.n


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    num_swapped_out: int = 0  # preemptions by swap (the rest recompute)
    num_swapped_in: int = 0
    num_tokens_computed: int = 0  # every token fed through the model, recomputation included
    num_recomputed_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0


class LifecycleObserver(Protocol):
    """Told of admissions and finishes as they happen (the planner's layout shadows, kvpage.plan.shadow)."""

    def admitted(self, seq: Sequence, hit: PrefixHit, max_new_tokens: int, num_new_tokens: int,
                 num_running: int) -> None:
        """``seq`` was admitted with this prefix hit, computing ``num_new_tokens`` now, ``num_running`` before it."""

    def finished(self, seq: Sequence) -> None:
        """``seq`` ended; its pages and promise went back."""


class Lifecycle:
    """The events of every sequence's life, over one KV manager."""

    def __init__(self, config: SchedulerConfig, kv: KVManager, limit: LengthLimit, eos_token_ids: tuple[int, ...],
                 swap_cost: SwapPreference | None = None) -> None:
        self.config = config
        self.kv = kv
        self.limit = limit
        self.eos_token_ids = frozenset(eos_token_ids)
        self.swap_cost = swap_cost
        self.queues = SequenceQueues()
        self.events = EventLog()
        self.admission = AdmissionController(config, kv, self.events)
        self.counters = SchedulerCounters()
        self.beam_requests: dict[str, Request] = {}  # admitted beam searches, holding their seats
        self.finished_since_last_step: list[int] = []
        self.observers: list[LifecycleObserver] = []
        self._next_admit = 0
        self._min_pending = (-1, 0)  # (queues.waiting_version, smallest pending reservation in pages)

    # ----- submission ---------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None, n: int) -> None:
        """Refuse, with a clear error, a request that could never run to completion."""
        limit = self.limit.max_model_len
        if num_prompt_tokens >= limit:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; max_model_len is {limit}, "
                             "so a prompt may have at most max_model_len - 1 tokens")
        new_tokens = self.limit.max_new_tokens(num_prompt_tokens, max_tokens)
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

    def submit(self, request: Request) -> None:
        """Queue a request's first sequence (its siblings and beams come later, by forking)."""
        params = request.sampling_params
        width = num_sequences(params)
        self.check_fits(len(request.prompt_token_ids), params.max_tokens, width)
        self.queues.add_request(request)
        request.num_pending_forks = 0 if params.use_beam_search else params.n - 1
        if params.use_beam_search:  # beams grow by forking, step by step
            stops = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else self.eos_token_ids)
            request.beam = BeamGroup(width, params.n, params.length_penalty, params.early_stopping,
                                     stops, self.limit.max_new_tokens(len(request.prompt_token_ids),
                                                                      params.max_tokens))
        seq = self.queues.new_sequence(request, list(request.prompt_token_ids), SequenceStatus.WAITING)
        if request.beam is not None:
            request.beam.running = [(seq.seq_id, 0.0)]

    def abort(self, request_id: str) -> Request | None:
        request = self.queues.remove_request(request_id)
        if request is None:
            return None
        request.num_pending_forks = 0
        for seq in list(request.sequences):
            if not seq.is_finished:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return request

    # ----- admission, preemption, swap -----------------------------------------------
    def admit(self, seq: Sequence, hit: PrefixHit, max_new_tokens: int, num_new_tokens: int) -> None:
        """``seq`` has its pages (from its prefix hit on) and computes ``num_new_tokens`` now: it joins the batch."""
        request = seq.request
        num_running = len(self.queues.running)
        self.admission.on_admit(seq, max_new_tokens)
        if reads_prefix_cache(seq):  # a sequence that may not read the cache did not query it
            self.kv.record_prefix_query(seq.num_tokens, hit.num_tokens)
        seq.num_computed_tokens = hit.num_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = hit.num_tokens
        if request.times is not None and request.times.scheduled is None:
            request.times.scheduled = time.monotonic()
        if request.admit_rank is None:
            request.admit_rank = self._next_admit
            if request.beam is not None:
                self.beam_requests[request.request_id] = request
        seq.admit_order = self._take_admit_order()
        self.queues.move(seq, SequenceStatus.RUNNING)
        for observer in self.observers:
            observer.admitted(seq, hit, max_new_tokens, num_new_tokens, num_running)

    def _take_admit_order(self) -> int:
        order = self._next_admit
        self._next_admit += 1
        return order

    def preempt(self, seq: Sequence, reason: str) -> list[PageCopy] | None:
        """Take a running sequence's pages: swapped out (returns the copies) or freed for recompute (None).

        ``reason`` says what needed the pages, for the event log.
        """
        self.counters.num_preemptions += 1
        request_id, computed = seq.request.request_id, seq.num_computed_tokens
        if should_swap(self.config.preemption_mode, seq, self.kv, self.swap_cost):
            copies = self.kv.swap_out(seq.seq_id)
            if copies is not None:
                self.counters.num_swapped_out += 1
                self.queues.move(seq, SequenceStatus.SWAPPED)
                self.events.preempted(request_id, seq.seq_id, "swap", computed, reason)
                return copies
        self.events.preempted(request_id, seq.seq_id, "recompute", computed, reason)
        self.kv.free(seq.seq_id)
        self.admission.on_release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.queues.move(seq, SequenceStatus.WAITING)
        return None

    def swap_in(self, seq: Sequence) -> list[PageCopy]:
        """Bring a swapped-out sequence back (the caller checked that its pages are available)."""
        copies = self.kv.swap_in(seq.seq_id)
        if copies is None:
            raise RuntimeError(f"sequence {seq.seq_id} was swapped in without the pages for it")
        self.counters.num_swapped_in += 1
        self.queues.move(seq, SequenceStatus.RUNNING)
        return copies

    # ----- forks ---------------------------------------------------------------------
    def fork(self, parent: Sequence, token_ids: list[int], fresh_order: bool) -> Sequence:
        """The one fork: a new sequence of ``parent``'s request, sharing the parent's pages where it can.

        A running parent's child shares every page (copy-on-write) and
        runs; if the parent is not running, or a contiguous layout has no
        run for the child, it waits and computes its K/V itself.
        ``fresh_order`` gives it an admission order of its own (parallel
        samples) rather than its parent's (a beam takes its parent's place).
        """
        request = parent.request
        if parent.status is not SequenceStatus.RUNNING or not self.kv.can_fork(parent.seq_id):
            return self.queues.new_sequence(request, token_ids, SequenceStatus.WAITING)
        order = self._take_admit_order() if fresh_order else parent.admit_order
        child = self.queues.new_sequence(request, token_ids, SequenceStatus.RUNNING, admit_order=order)
        self.kv.fork(parent.seq_id, child.seq_id)
        self.admission.on_fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
        return child

    def fork_samples(self, parent: Sequence) -> None:
        """Start the siblings of a parent that has computed all its prompt but the last token."""
        request = parent.request
        for _ in range(request.num_pending_forks):
            self.fork(parent, list(parent.token_ids), fresh_order=True)
        request.num_pending_forks = 0

    # ----- finishing -------------------------------------------------------------------
    def finish(self, seq: Sequence, status: SequenceStatus, stop_reason: int | str | None = None) -> None:
        """End a sequence (a no-op if it has ended): its pages and promise go back."""
        if seq.is_finished:
            return
        seq.stop_reason = stop_reason
        self.queues.move(seq, status)
        self.kv.free(seq.seq_id)
        self.admission.on_release(seq)
        self.finished_since_last_step.append(seq.seq_id)
        request = seq.request
        if request.is_finished:
            self.beam_requests.pop(request.request_id, None)
            self.admission.on_request_done(request)
        for observer in self.observers:
            observer.finished(seq)

    def stop_by_string(self, seq: Sequence, stop: str) -> None:
        """A stop string matched: the sequence ends as stopped, also if EOS or length ended it this very step."""
        if seq.is_finished:
            seq.stop_reason = stop
            self.queues.move(seq, SequenceStatus.FINISHED_STOPPED)
        else:
            self.finish(seq, SequenceStatus.FINISHED_STOPPED, stop)

    def take_finished(self) -> list[int]:
        """Sequences that ended since the last call (the runner drops their state)."""
        finished, self.finished_since_last_step = self.finished_since_last_step, []
        return finished

    def kv_waste(self) -> KVWaste:
        """The cache by kind of waste now; external fragmentation is judged against the waiting requests."""
        return self.kv.waste(self.admission.reserved_pages(), self.min_pending_pages())

    def min_pending_pages(self) -> int | None:
        """The smallest reservation a waiting request needs, in pages (None: paging, or nobody waits).

        A hole smaller than this is external fragmentation.
        """
        admission, queues = self.admission, self.queues
        if not queues.waiting or self.kv.reservation_tokens(1) is None:
            return None
        # A waiting sequence's reservation never changes, so the minimum holds until the queue does
        # (a walk of the whole queue every step was most of a contiguous replay under pressure).
        if self._min_pending[0] != queues.waiting_version:
            reservations = (admission.reservation_tokens(seq.num_prompt_tokens, self.limit.max_new_tokens(
                seq.num_prompt_tokens, seq.request.sampling_params.max_tokens)) for seq in queues.waiting)
            self._min_pending = (queues.waiting_version, min(self.kv.pages_for_tokens(r or 0) for r in reservations))
        return self._min_pending[1]
