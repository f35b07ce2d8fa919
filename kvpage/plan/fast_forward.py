"""Decode fast-forward: the replay's exact shortcut through runs of decode steps (pure Python).

Most steps the scheduler plans for a trace are simple: every running
sequence computes its last token and samples the next, nothing is
preempted, and at most the requests that just arrived are admitted.
Stepping through them one by one costs a few microseconds a sequence and a
step (planning, allocating, committing, the stop check), which is most of
what a replay costs.  Yet such a run is predictable from its first step:
sequence ``s``, with ``p`` tokens computed, fills a page at every step
``j`` where ``p + j`` is a multiple of ``block_size``, needs a fresh page
at the step after, and stops by length at a step known in advance; its
"sampled" tokens are a function of its id.

:func:`fast_forward` therefore advances every running sequence through
such a run paying only for its *events*, and for O(1) bookkeeping a step:

* a decode step's time comes from the cost model's
  :meth:`~kvpage.plan.replay.CostModel.decode_step`, the same float
  :meth:`step_time` gives for the step's shape, and the virtual clock adds
  the same floats in the same order;
* page allocations (with any eviction; a contiguous layout has none, as
  each sequence's reservation covers its run) and finishes (with their
  page releases) run through the real KV manager and the scheduler's own
  results and lifecycle (:meth:`~kvpage.sched.results.StepResults.commit_decodes`,
  :meth:`~kvpage.sched.lifecycle.Lifecycle.finish`), step by step and,
  within a step, in the running order the stepped scheduler would use;
* when requests arrive, the step that admits them is the scheduler's own
  second half of a step (:meth:`~kvpage.sched.Scheduler.schedule_after_decodes`:
  swap-ins and admission with the budget the decodes leave), committed and
  resolved by the scheduler's results; admitted sequences that decode from
  the next step on join the run;
* the tokens a sequence computes are committed once, at its finish or when
  the run stops, so its filled pages join the prefix cache then.  Nothing
  can tell: only an admission looks the cache up, and the replay's
  generated tokens lie outside the vocabulary (:func:`fake_token`), so no
  prompt can match a page that holds one;
* meanwhile every step's KV waste snapshot follows from three counters
  (stored slots grow by one a sequence, touched pages and pages in use by
  one a fresh page): the snapshot is affine in them, so the run keeps the
  three a step and the recorder takes the run's steps at once
  (:meth:`~kvpage.plan.recorder.StepRecorder.flush`) with every step's
  exact figures.

It is a shortcut of :class:`~kvpage.sched.step_loop.StepLoop`'s
synchronous order, not a second copy of it: the length rule is the
scheduler's (:class:`~kvpage.sched.limits.LengthLimit`), admission is the
scheduler's, and a run starts only from a state in which stepping is
provably this simple, and stops before the first step that could differ:
the pages due in the next step are not all available (the scheduler would
preempt), a request arrives that could displace a running one (a beam
search, or a higher priority), or after a step that leaves a request
waiting or admits one that does not simply decode.  Everything else the
stepped replay records (per-step waste, thrashing rates, series, request
timings) is fed the same values.  tests/test_plan_fast_forward.py compares
whole replays, stepped and fast-forwarded, value for value.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

from kvpage.kv import KVWaste
from kvpage.plan.cost import DecodeTimer
from kvpage.sched import Scheduler, Sequence, SequenceStatus
from kvpage.step_io import SampledToken, SchedulerOutput

FIRST_FAKE_TOKEN = 3  # ids below are special tokens (the beams' synthetic candidates start here)


def fake_token(seq_id: int, vocab_size: int) -> int:
    """The replay's "sampled" token of a sequence, at every position.

    Never an id of the vocabulary: no trace prompt, which holds only
    vocabulary ids, can match a page of generated tokens (as with real
    sampling, no prompt could predict them). Distinct for every sequence,
    so no two sequences share a generated page by accident; the same at
    every position of one, as the pages of a sequence already differ by
    their chained keys, and a list of one repeated int costs nothing to
    build (a replay generates tens of millions of tokens).
    """
    return vocab_size + seq_id


def fake_token_ids(seq_id: int, count: int, vocab_size: int) -> list[int]:
    """``count`` tokens of :func:`fake_token`."""
    return [fake_token(seq_id, vocab_size)] * count


# (how many, K/V tokens they read, the longest context) of the decodes of a step that the run accounts for
DecodeSums = tuple[int, int, int]
# A step of a run, as the run records it, all at once (StepRecord.flush): its end, stored slots, touched pages,
# pages in use, then evictions, tokens computed and tokens generated so far, and the sequences it ran.
RunStep = tuple[float, int, int, int, int, int, int, int]
FLUSH_STEPS = 4096  # the most steps a run keeps before recording them


class Device(Protocol):
    """What the run asks of the virtual device (:class:`kvpage.plan.replay.VirtualDevice`)."""

    vocab_size: int

    def decode_step(self, batch: int) -> DecodeTimer:
        """Seconds of a decode-only step of ``batch`` sequences, given its K/V sums."""

    def run_with_decodes(self, out: SchedulerOutput, decodes: DecodeSums) -> tuple[float, list[SampledToken]]:
        """Seconds of a step of ``out`` plus the run's decodes, and the tokens ``out``'s sequences sample."""


class Arrivals(Protocol):
    """The trace's requests not added yet (:class:`kvpage.plan.replay.TraceArrivals`)."""

    @property
    def next_time(self) -> float:
        """When the next one arrives; infinity when none is left."""

    def add_due(self, now: float) -> None:
        """Add every request that has arrived by ``now`` to the scheduler."""


class StepRecord(Protocol):
    """What the replay records after each step (:class:`kvpage.plan.replay.StepRecorder`)."""

    def tokens(self, seqs: Seq[Sequence], now: float) -> None: ...

    def step(self, now: float, batch_size: int, waste: KVWaste) -> None: ...

    @property
    def buffered(self) -> list[RunStep]:
        """Steps the run has taken but not recorded yet; :meth:`flush` records them."""

    def flush(self, origin: KVWaste, deltas: tuple[tuple[int, ...], ...]) -> None:
        """:meth:`step` of each buffered step: its snapshot is ``origin`` plus ``deltas`` times its three sums."""


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
    """The running sequences of a decode run, indexed by the steps of their events.

    A sequence that joins at step ``s`` with ``p`` tokens computed counts as
    having started from ``p - s`` (its ``start``): in step ``j`` it has
    ``start + j`` computed.
    """

    # Sequence ids, by the residue of the step at which they fill a page ((start + j) % bs == 0), in running order.
    fills: list[list[int]]
    finishing: dict[int, list[Sequence]]  # by the step after which they finish by length
    start: dict[int, int]
    on_demand: bool  # pages come as tokens do (paging); else each sequence's reservation already covers its run
    max_priority: int = 0  # the largest (least urgent) priority value running: no arrival ranks before it
    base_kv: int = 0  # K/V tokens read in step j: base_kv + batch * j
    longest: int | None = None  # the longest context in step j is longest + j; None: none yet, or to find again
    touched: int = 0  # pages the sequences' tokens occupy, each counted alone (KVManager.waste_given)

    def join(self, sched: Scheduler, seq: Sequence, step: int) -> bool:
        """Add ``seq`` if from the next step on it only decodes until it finishes by length; False if not."""
        kv = sched.kv
        left = steps_left(sched, seq)
        if left is None or kv.copies_before_write(seq.seq_id):
            return False
        bs = kv.block_size
        p = seq.num_computed_tokens
        held = len(kv.page_ids(seq.seq_id))
        # Paging: it holds exactly the pages its tokens fill, so its first step allocates exactly when p is a
        # page boundary. A reservation: it holds every slot the run can write.
        if (held != -(-p // bs)) if self.on_demand else (held * bs < p + left):
            return False
        start = p - step
        self.start[seq.seq_id] = start
        self.fills[-start % bs].append(seq.seq_id)
        self.finishing.setdefault(step + left, []).append(seq)
        self.base_kv += start
        self.longest = start if self.longest is None else max(self.longest, start)
        self.touched += -(-p // bs)
        self.max_priority = max(self.max_priority, seq.request.priority)
        return True


def _start_run(sched: Scheduler) -> _Run | None:
    """The run that starts from this state, or None if stepping could do more than decode."""
    kv = sched.kv
    running = sched.running
    if not running or sched.waiting or sched.swapped or len(running) > sched.config.max_num_batched_tokens:
        return None
    run = _Run([[] for _ in range(kv.block_size)], {}, {}, kv.reservation_tokens(1) is None,
               max_priority=running[0].request.priority)
    return run if all(run.join(sched, seq, 0) for seq in running) else None


def _may_admit_in_run(sched: Scheduler, run: _Run) -> bool:
    """Whether admitting the waiting requests cannot preempt a running sequence (so the decodes stand)."""
    return all(seq.request.beam is None and seq.request.priority >= run.max_priority for seq in sched.waiting)


def fast_forward(sched: Scheduler, now: float, arrivals: Arrivals, device: Device, recorder: StepRecord
                 ) -> tuple[float, int]:
    """Run decode steps, admitting arrivals, while they are provably all that stepping would do.

    Returns (now, steps run); ``(now, 0)`` when the state does not allow a
    run, with nothing changed but the requests due by ``now`` added (as
    stepping adds them before its next step).
    """
    run = _start_run(sched)
    if run is None:
        return now, 0
    return _RunLoop(sched, run, arrivals, device, recorder, now).go()


class _RunLoop:
    """One run's steps: a loop for the common step, and a method for each event.

    The loop keeps what changes every step in locals (benchmarks/hot_loop_aliases.py
    measures what that buys) and hands them over, through attributes, to the
    event methods, which run once an arrival or a finish.
    """

    def __init__(self, sched: Scheduler, run: _Run, arrivals: Arrivals, device: Device, recorder: StepRecord,
                 now: float) -> None:
        self.sched, self.run, self.arrivals, self.device, self.recorder = sched, run, arrivals, device, recorder
        self.kv = sched.kv
        self.alive = list(sched.running)  # sched.running changes as sequences finish and join
        self.now, self.step, self.batch = now, 0, len(self.alive)
        self.stored, self.touched = self.kv.num_tokens_stored, run.touched
        self.longest = run.longest if run.longest is not None else 0
        self.timer = device.decode_step(self.batch)
        # A step's snapshot is affine in its stored slots, touched pages and pages in use (KVManager.waste_given):
        # the snapshot of none and the change for one more of each describe every step.
        waste_given = self.kv.waste_given
        self.origin = waste_given(0, 0, 0, 0, 0)
        self.deltas = (_delta(waste_given(1, 0, 0, 0, 0), self.origin), _delta(waste_given(0, 1, 0, 0, 0), self.origin),
                       _delta(waste_given(0, 0, 0, 0, 1), self.origin))

    def go(self) -> tuple[float, int]:
        sched, run, kv, arrivals, recorder = self.sched, self.run, self.kv, self.arrivals, self.recorder
        fills, finishing, bs, on_demand = run.fills, run.finishing, kv.block_size, run.on_demand
        counters, buffered = sched.counters, recorder.buffered
        grow, record, waste_given, reserved_pages = kv.grow, recorder.step, kv.waste_given, \
            sched.admission.reserved_pages
        now, step, batch, stored, touched, longest, timer = (self.now, self.step, self.batch, self.stored,
                                                             self.touched, self.longest, self.timer)
        # While admission holds no pages back (no conservative promise: its reservation is not affine in the
        # pages in use), each step is recorded as a RunStep, all at once when the run ends.
        bulk = sched.admission.promised_pages == 0
        in_use, evictions = kv.num_pages_in_use, kv.num_evictions  # change only where pages do: read again there
        base_kv = run.base_kv  # changes only at events
        while batch:
            admitting = now >= arrivals.next_time
            if admitting:
                arrivals.add_due(now)
                if not _may_admit_in_run(sched, run):
                    break  # stepping decides this step
            allocating = fills[step % bs]  # filled a page in the step before: the next token starts a new one
            if on_demand and allocating:
                if len(allocating) > kv.num_available_pages:
                    break  # the stepped scheduler would preempt
                grow(allocating)  # a fresh page each, in running order
                in_use, evictions = kv.num_pages_in_use, kv.num_evictions
            step += 1
            touched += len(allocating)
            stored += batch
            counters.num_tokens_computed += batch
            counters.num_generated_tokens += batch
            done = finishing.pop(step, None)
            if not (admitting or done):
                now += timer(base_kv + batch * step, batch * (longest + step))
                if bulk:
                    buffered.append((now, stored, touched, in_use, evictions, counters.num_tokens_computed,
                                     counters.num_generated_tokens, batch))
                else:
                    record(now, batch, waste_given(stored, touched, reserved_pages()))
                continue
            self.now, self.step, self.stored, self.touched = now, step, stored, touched
            step_batch, ends = self._events(admitting, done)
            now, stored, touched = self.now, self.stored, self.touched
            if ends:  # the next step is the scheduler's: leave every table committed, and record what it sees
                self._flush()
                _commit_run(sched, run, self.alive, step, self.device.vocab_size)
                record(now, step_batch, sched.kv_waste())
                return now, step
            batch, longest, timer = self.batch, self.longest, self.timer
            in_use, evictions, base_kv = kv.num_pages_in_use, kv.num_evictions, run.base_kv
            bulk = sched.admission.promised_pages == 0
            if bulk:
                buffered.append((now, stored, touched, in_use, evictions, counters.num_tokens_computed,
                                 counters.num_generated_tokens, step_batch))
                if len(buffered) >= FLUSH_STEPS:
                    self._flush()
            else:
                self._flush()
                record(now, step_batch, waste_given(stored, touched, reserved_pages()))
        self.now, self.step = now, step
        self._flush()
        _commit_run(sched, run, self.alive, step, self.device.vocab_size)
        return now, step

    def _flush(self) -> None:
        """Record the buffered steps (their snapshots: the origin plus the deltas times their sums)."""
        if self.recorder.buffered:
            self.recorder.flush(self.origin, self.deltas)

    def _events(self, admitting: bool, done: list[Sequence] | None) -> tuple[int, bool]:
        """This step's admission and finishes; returns (sequences it ran, whether the run ends after it)."""
        step_batch = self.batch
        if admitting:
            admitted, sampled = self._admit()
            step_batch += len(admitted.sequences)
        else:
            self.now += self.timer(self.run.base_kv + self.batch * self.step, self.batch * (self.longest + self.step))
        if done:
            self._finish(done)
        ends = admitting and self._join(admitted, sampled)
        if not ends:
            run, alive = self.run, self.alive
            if run.longest is None and alive:
                run.longest = max(run.start[seq.seq_id] for seq in alive)
            self.longest = run.longest if run.longest is not None else 0
            if len(alive) != self.batch:
                self.batch = len(alive)
                if alive:
                    self.timer = self.device.decode_step(self.batch)
        return step_batch, ends

    def _admit(self) -> tuple[SchedulerOutput, list[SampledToken]]:
        """The scheduler admits what arrived, with the budget the decodes leave; the step runs on the device."""
        sched, kv = self.sched, self.kv
        held = kv.num_tokens_stored
        admitted = sched.schedule_after_decodes(self.batch)
        sched.results.commit(admitted)
        decodes = (self.batch, self.run.base_kv + self.batch * self.step, self.longest + self.step)
        seconds, sampled = self.device.run_with_decodes(admitted, decodes)
        self.now += seconds
        self.stored += kv.num_tokens_stored - held
        return admitted, sampled

    def _finish(self, done: list[Sequence]) -> None:
        """Sequences reach their length, in running order, as the stepped results finish them."""
        sched, run, kv, step = self.sched, self.run, self.kv, self.step
        bs, vocab_size = kv.block_size, self.device.vocab_size
        for seq in done:
            p = run.start[seq.seq_id]
            computed = p + step
            sched.results.commit_decodes(seq, fake_token_ids(seq.seq_id, computed + 1 - len(seq.token_ids),
                                                             vocab_size), computed)
            held = kv.num_tokens_stored
            sched.life.finish(seq, SequenceStatus.FINISHED_LENGTH)
            self.stored -= held - kv.num_tokens_stored
            self.touched -= -(-computed // bs)
            run.fills[-p % bs].remove(seq.seq_id)
            self.alive.remove(seq)
            run.base_kv -= p
            if p == self.longest:
                run.longest = None  # found again after the step's events
        self.recorder.tokens(done, self.now)

    def _join(self, admitted: SchedulerOutput, sampled: list[SampledToken]) -> bool:
        """Resolve the admitted sequences' tokens and let them join; True if the scheduler plans the next step."""
        sched, run, kv = self.sched, self.run, self.kv
        held = kv.num_tokens_stored
        got = sched.results.resolve(admitted, sampled)
        self.stored += kv.num_tokens_stored - held
        self.recorder.tokens(got, self.now)
        run.touched = self.touched
        ends = False
        for scheduled in admitted.sequences:
            seq = sched.live.get(scheduled.seq_id)
            if seq is not None:
                ends |= not run.join(sched, seq, self.step)
                self.alive.append(seq)
        self.touched = run.touched
        # Something waits, or runs outside the run (a fork of an admitted request's samples), or the next
        # step's decodes would not all fit the token budget: the scheduler plans the next step.
        alive = self.alive
        return (ends or bool(sched.waiting) or len(sched.running) != len(alive)
                or len(alive) > sched.config.max_num_batched_tokens)


def _delta(after: KVWaste, before: KVWaste) -> tuple[int, ...]:
    return tuple(a - b for a, b in zip(after, before))


def _commit_run(sched: Scheduler, run: _Run, alive: list[Sequence], step: int, vocab_size: int) -> None:
    """Commit what each sequence computed in the run.

    Its filled pages join the prefix cache only now: nothing looks the cache
    up but an admission, and no prompt holds a generated (fake) token.
    """
    for seq in alive:
        if seq.seq_id not in run.start:
            continue  # admitted in the last step, and committed by it
        computed = run.start[seq.seq_id] + step
        if computed > seq.num_computed_tokens:
            sched.results.commit_decodes(seq, fake_token_ids(seq.seq_id, computed + 1 - len(seq.token_ids),
                                                             vocab_size), computed)
