"""Decode fast-forward: the replay's exact shortcut through runs of decode-only steps (pure Python).

Between two arrivals the scheduler mostly plans decode-only steps: every
running sequence computes its last token and samples the next, nothing is
admitted, nothing is preempted.  Stepping through them one by one costs a
few microseconds a sequence and a step (planning, allocating, committing,
the stop check), which is most of what a replay costs.  Yet the whole run
is predictable from its first step: sequence ``s``, with ``p`` tokens
computed, fills a page at every step ``j`` where ``p + j`` is a multiple
of ``block_size``, needs a fresh page at the step after, and stops by
length at a step known in advance; its "sampled" tokens are a function of
its id and position.

:func:`fast_forward` therefore advances every running sequence through
such a run paying only for its *events*, and for O(1) bookkeeping a step:

* each step's time comes from the same cost model, called with the step's
  :class:`~kvpage.plan.cost.StepShape` (kept as running sums), so the
  virtual clock adds exactly the same floats in the same order;
* page allocations (with any eviction; a contiguous layout has none, as
  each sequence's reservation covers its run), full-page commits (with their
  prefix-cache registration) and finishes (with their page releases) run
  through the real KV manager and the scheduler's own results and
  lifecycle (:meth:`~kvpage.sched.results.StepResults.commit_decodes`,
  :meth:`~kvpage.sched.lifecycle.Lifecycle.finish`), step by step and,
  within a step, in the running order the stepped scheduler would use;
* the tokens a sequence computes between its events are committed once, at
  its next event or when the run stops; meanwhile the KV waste snapshot of
  every step is computed from counters (stored slots grow by one a
  sequence, unshared pages by one a fresh page), so the recorder sees every
  step's exact figures.

It is a shortcut of :class:`~kvpage.sched.step_loop.StepLoop`'s
synchronous order, not a second copy of it: the length rule is the
scheduler's (:class:`~kvpage.sched.limits.LengthLimit`), and a run starts
only from a state in which stepping is provably this simple,
and stops before the first step that could differ: an arrival is due (the
scheduler would admit), or the pages due in the next step are not all
available (the scheduler would preempt).  Everything else the stepped
replay records (per-step waste, thrashing rates, series, request timings)
is fed the same values.  tests/test_plan_fast_forward.py compares whole
replays, stepped and fast-forwarded, value for value.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

from kvpage.kv import KVWaste
from kvpage.plan.cost import StepShape
from kvpage.sched import Scheduler, Sequence, SequenceStatus

FIRST_FAKE_TOKEN = 3  # ids below are special tokens
SEQ_STRIDE, POSITION_STRIDE = 1_000_003, 7919


def fake_token(seq_id: int, position: int, vocab_size: int) -> int:
    """The replay's "sampled" token of a sequence at a position: distinct for every sequence and position."""
    return FIRST_FAKE_TOKEN + (seq_id * SEQ_STRIDE + position * POSITION_STRIDE) % (vocab_size - FIRST_FAKE_TOKEN)


def fake_token_ids(seq_id: int, start: int, stop: int, vocab_size: int) -> list[int]:
    """``fake_token`` at positions ``start .. stop - 1``, without a call per token."""
    span = vocab_size - FIRST_FAKE_TOKEN
    first = seq_id * SEQ_STRIDE + start * POSITION_STRIDE
    return [FIRST_FAKE_TOKEN + x % span for x in range(first, seq_id * SEQ_STRIDE + stop * POSITION_STRIDE,
                                                        POSITION_STRIDE)]


class StepCost(Protocol):
    def step_time(self, shape: StepShape) -> float: ...


class StepRecord(Protocol):
    """What the replay records after each step (:class:`kvpage.plan.replay.StepRecorder`)."""

    def tokens(self, seqs: Seq[Sequence], now: float) -> None: ...

    def step(self, now: float, batch_size: int, waste: KVWaste) -> None: ...


def steps_left(sched: Scheduler, seq: Sequence) -> int | None:
    """Steps after which ``seq`` finishes by length if it decodes every step; None if it is not such a sequence.

    Such a sequence has computed all its tokens but the last sampled one,
    has no recomputation or prompt left, no pending forks, and can stop
    only by length (:meth:`~kvpage.sched.results.StepResults.stops_by_length_only`).
    """
    num_tokens = len(seq.token_ids)
    computed = seq.num_computed_tokens
    if (seq.request.num_pending_forks or computed != num_tokens - 1 or num_tokens <= seq.num_prompt_tokens
            or computed < seq.max_computed_tokens or not sched.results.stops_by_length_only(seq)):
        return None
    return sched.life.limit.tokens_left(seq, num_tokens)


@dataclass
class _Run:
    """The running sequences of a decode run, indexed by the steps of their events."""

    fills: list[list[Sequence]]  # by the residue of the step at which they fill a page: (p + j) % bs == 0
    finishing: dict[int, list[Sequence]]  # by the step after which they finish by length
    start: dict[int, int]  # tokens each had computed when the run began
    on_demand: bool  # pages come as tokens do (paging); else each sequence's reservation already covers its run
    base_kv: int = 0  # K/V tokens read in step j: base_kv + batch * j
    longest: int = 0  # the longest context in step j: longest + j
    touched: int = 0  # pages the sequences' tokens occupy, each counted alone (KVManager.waste_given)


def _start_run(sched: Scheduler, now: float, next_arrival: float) -> _Run | None:
    """The run that starts from this state, or None if stepping could do more than decode."""
    kv = sched.kv
    running = sched.running
    if (now >= next_arrival or not running or sched.waiting or sched.swapped
            or len(running) > sched.config.max_num_batched_tokens):
        return None
    bs = kv.block_size
    on_demand = kv.reservation_tokens(1) is None
    run = _Run([[] for _ in range(bs)], {}, {}, on_demand)
    for seq in running:
        left = steps_left(sched, seq)
        if left is None or kv.copies_before_write(seq.seq_id):
            return None
        p = seq.num_computed_tokens
        held = len(kv.page_ids(seq.seq_id))
        # Paging: it holds exactly the pages its tokens fill, so the first step allocates exactly when p is a
        # page boundary. A reservation: it holds every slot the run can write.
        if (held != -(-p // bs)) if on_demand else (held * bs < p + left):
            return None
        run.start[seq.seq_id] = p
        run.fills[-p % bs].append(seq)
        run.finishing.setdefault(left, []).append(seq)
        run.base_kv += p
        run.longest = max(run.longest, p)
        run.touched += -(-p // bs)
    return run


def fast_forward(sched: Scheduler, now: float, next_arrival: float, cost: StepCost, recorder: StepRecord,
                 vocab_size: int) -> tuple[float, int]:
    """Run decode-only steps while they are provably all that stepping would do; returns (now, steps run).

    ``next_arrival`` is the arrival time of the next request not yet added:
    the stepped replay adds it before the first step that starts at or
    after it, so the run stops there.  Returns ``(now, 0)`` with nothing
    changed when the state does not allow a run.
    """
    run = _start_run(sched, now, next_arrival)
    if run is None:
        return now, 0
    kv = sched.kv
    bs = kv.block_size
    fills, finishing, start, base_kv, longest, touched = (run.fills, run.finishing, run.start, run.base_kv,
                                                          run.longest, run.touched)
    running = sched.running
    alive = list(running)  # sched.running shrinks as sequences finish
    batch = len(alive)
    stored = kv.num_tokens_stored
    counters, results, life, admission = sched.counters, sched.results, sched.life, sched.admission
    step = 0
    while now < next_arrival and batch:
        allocating = fills[step % bs]  # filled a page in the step before: the next token starts a new one
        if run.on_demand:
            if len(allocating) > kv.num_available_pages:
                break  # the stepped scheduler would preempt
            for seq in allocating:  # its table is committed up to the page boundary: one fresh page
                kv.allocate(seq.seq_id, 1)
        step += 1
        kv_read = base_kv + batch * step
        now += cost.step_time(StepShape(batch, 0, batch, batch, kv_read, batch * (longest + step), kv_read))
        counters.num_tokens_computed += batch
        counters.num_generated_tokens += batch
        stored += batch
        touched += len(allocating)
        done = finishing.pop(step, None)
        # A filled page is committed at once where it may join the prefix cache and the next allocation
        # reads the table; a contiguous reservation needs neither, so its tokens wait for the finish.
        events: Seq[Sequence] = fills[step % bs] if run.on_demand else ()
        if done:  # finishes interleave with commits in running order, as in the stepped results
            events = sorted({*events, *done}, key=alive.index)
            ending = set(done)
        for seq in events:
            p = start[seq.seq_id]
            computed = p + step
            tokens = seq.token_ids
            if done and seq in ending:
                results.commit_decodes(seq, fake_token_ids(seq.seq_id, len(tokens), computed + 1, vocab_size),
                                       computed)
                held = kv.num_tokens_stored
                life.finish(seq, SequenceStatus.FINISHED_LENGTH)
                stored -= held - kv.num_tokens_stored
                touched -= -(-computed // bs)
                fills[-p % bs].remove(seq)
                alive.remove(seq)
                base_kv -= p
                if p == longest:
                    longest = -1  # found again below
            else:  # a page fills: commit it now, so that it is registered in the prefix cache at this step
                results.commit_decodes(seq, fake_token_ids(seq.seq_id, len(tokens), computed, vocab_size), computed)
        step_batch = batch
        if done:
            recorder.tokens(done, now)
            batch = len(alive)
            if longest < 0 and alive:
                longest = max(start[seq.seq_id] for seq in alive)
        recorder.step(now, step_batch, kv.waste_given(stored, touched, admission.reserved_pages()))
    for seq in alive if step else ():  # commit what each sequence computed since its last event
        tokens = seq.token_ids
        computed = start[seq.seq_id] + step
        results.commit_decodes(seq, fake_token_ids(seq.seq_id, len(tokens), computed + 1, vocab_size), computed)
    return now, step
