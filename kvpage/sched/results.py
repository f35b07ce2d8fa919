"""Applying a step's results: computed K/V, sampled tokens, and the token stop rules (pure Python).

A step's results are applied in two halves.  :meth:`StepResults.commit`
runs as soon as the step is scheduled: its K/V counts as computed, pages
that filled are committed, and each sampling sequence has one token *in
flight* (it counts toward the sequence's length, its id is not known yet),
so the next step can be scheduled while this one runs on the device.
:meth:`StepResults.resolve` runs when the sampled ids arrive: it appends
them and applies the token stops (EOS unless ``ignore_eos``,
``stop_token_ids``, and the length rule of :mod:`kvpage.sched.limits`),
and advances beam searches whose beams all have their candidates.
Stop *strings* need text; the engine checks them after ``resolve``
(:mod:`kvpage.output_builder`).
"""

from __future__ import annotations

from kvpage.sched import prompt_logprobs
from kvpage.sched.beam_search import advance_beams
from kvpage.sched.lifecycle import Lifecycle
from kvpage.sched.sequence import Request, Sequence, SequenceStatus
from kvpage.step_io import SampledToken, SchedulerOutput


class StepResults:
    """Commits and resolves steps against the sequences of one :class:`~kvpage.sched.lifecycle.Lifecycle`."""

    def __init__(self, life: Lifecycle) -> None:
        self.life = life

    def commit(self, out: SchedulerOutput) -> None:
        """Record the scheduled tokens as computed; every sampling sequence gets one token in flight."""
        life = self.life
        counters, live_seqs, commit, limit = life.counters, life.queues.live, life.kv.commit, life.limit
        for scheduled in out.sequences:
            seq = live_seqs.get(scheduled.seq_id)
            if seq is None:  # aborted during the step
                continue
            start = seq.num_computed_tokens
            num_new = len(scheduled.input_token_ids)
            computed = seq.num_computed_tokens = start + num_new
            counters.num_tokens_computed += num_new
            if start < seq.max_computed_tokens:  # computed before a preemption: recomputation
                counters.num_recomputed_tokens += min(computed, seq.max_computed_tokens) - start
            seq.max_computed_tokens = max(seq.max_computed_tokens, computed)
            if start < seq.num_prompt_tokens:
                counters.num_prompt_tokens_computed += min(computed, seq.num_prompt_tokens) - start
            commit(seq.seq_id, seq.token_ids, computed)
            if scheduled.prompt_logprob_positions:  # (checked here: this runs for every sequence of every step)
                prompt_logprobs.on_commit(seq, scheduled)
            request = seq.request
            if request.num_pending_forks and computed == seq.compute_target:
                life.fork_samples(seq)
            if scheduled.sample and request.beam is None:
                seq.num_inflight_tokens += 1
                if limit.reached(seq, len(seq.token_ids) + seq.num_inflight_tokens):
                    seq.last_token_inflight = True

    def resolve(self, out: SchedulerOutput, sampled: list[SampledToken]) -> list[Sequence]:
        """Append the sampled tokens of a committed step and apply stops. Returns the sequences that got one."""
        samples = iter(sampled)
        touched: list[Sequence] = []
        beam_requests: dict[str, Request] = {}
        life = self.life
        counters, live_seqs, kv = life.counters, life.queues.live, life.kv
        bs = kv.block_size
        for scheduled in out.sequences:
            if scheduled.prompt_logprob_positions:
                seq = live_seqs.get(scheduled.seq_id)
                if seq is not None:  # (an aborted request's scores are dropped)
                    prompt_logprobs.on_resolve(seq, scheduled)
            if not scheduled.sample:
                continue
            token = next(samples)
            seq = live_seqs.get(scheduled.seq_id)
            if seq is None:  # aborted, or stopped by a token of the step before
                continue
            request = seq.request
            if request.beam is not None:
                if token.beam_candidates is None:
                    raise ValueError(f"beam sequence {seq.seq_id} was sampled without beam candidates")
                request.beam.candidates[seq.seq_id] = token.beam_candidates
                beam_requests[request.request_id] = request
                continue
            seq.num_inflight_tokens -= 1
            seq.append_token(token.token_id, token.logprobs)
            if len(seq.token_ids) % bs == 0 and seq.num_computed_tokens >= len(seq.token_ids):
                # The step after computed this token's K/V before its id was known: its page is full now.
                kv.index_full_pages(seq.seq_id, seq.token_ids)
            counters.num_generated_tokens += 1
            touched.append(seq)
            self._check_token_stop(seq, token.token_id)
        for request in beam_requests.values():
            if request.beam is not None and request.beam.ready():
                touched += advance_beams(life, request)
        return touched

    def _check_token_stop(self, seq: Sequence, token_id: int) -> None:
        life = self.life
        params = seq.request.sampling_params
        num_out = len(seq.token_ids) - seq.num_prompt_tokens
        if num_out >= params.min_tokens and (params.stop_token_ids or not params.ignore_eos):
            if not params.ignore_eos and token_id in life.eos_token_ids:
                life.finish(seq, SequenceStatus.FINISHED_STOPPED)
                return
            if params.stop_token_ids and token_id in params.stop_token_ids:
                life.finish(seq, SequenceStatus.FINISHED_STOPPED, token_id)
                return
        if life.limit.reached(seq, len(seq.token_ids)):
            life.finish(seq, SequenceStatus.FINISHED_LENGTH)

    def stops_by_length_only(self, seq: Sequence) -> bool:
        """Whether only the length rule can end ``seq`` (no EOS it heeds, no stop tokens, no beam search)."""
        params = seq.request.sampling_params
        return (seq.request.beam is None and not params.stop_token_ids
                and (params.ignore_eos or not self.life.eos_token_ids))

    def commit_decodes(self, seq: Sequence, new_token_ids: list[int], num_computed_tokens: int) -> None:
        """Apply a run of decode steps at once: ``seq`` generated ``new_token_ids`` and computed their K/V.

        The planner's decode fast-forward calls this for each sequence at its
        events (a page filled, a finish, the end of the run) instead of
        committing every step; :func:`kvpage.plan.fast_forward.fast_forward`
        is checked step for step against stepping.
        """
        seq.token_ids += new_token_ids
        self.life.kv.commit(seq.seq_id, seq.token_ids, num_computed_tokens)
        seq.num_computed_tokens = seq.max_computed_tokens = num_computed_tokens
