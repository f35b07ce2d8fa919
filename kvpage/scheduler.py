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

from kvpage.admission import group_size
from kvpage.batch import INFLIGHT_TOKEN, ScheduledSequence, SchedulerOutput
from kvpage.kv import KVCacheManager
from kvpage.request import Sequence, SequenceStatus
from kvpage.sequence_queues import SchedulerCounters, SequenceQueues
from kvpage.step_plan import StepPlan, is_parked, ranks_before, running_key, waiting_key

__all__ = ["Scheduler", "SchedulerCounters"]


class Scheduler(SequenceQueues):
    """Decides, step by step, which sequences run and how many tokens each computes."""

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
