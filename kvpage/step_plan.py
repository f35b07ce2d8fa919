"""The step being planned, and the orders in which the scheduler keeps its queues (pure Python).

A :class:`StepPlan` collects what one call of ``Scheduler.schedule`` decides:
the sequences that run and the page copies, swaps first among them, that
must happen before the forward pass, in the order the memory manager
decided them (a page freed by one operation may serve the next).

Queues are kept sorted: the waiting queue by priority, then arrival; the
running and swapped queues by priority, then the order in which requests
were first admitted (kept through preemptions), then the order in which
sequences joined.  The last running sequence is the next to be preempted,
so the oldest request is the last to lose pages and always progresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpage.batch import PageOps, ScheduledSequence, SchedulerOutput
from kvpage.request import Request, Sequence


@dataclass
class StepPlan:
    """The step being planned: sequences, their page copies, the token budget left."""

    budget: int
    planned: dict[int, ScheduledSequence] = field(default_factory=dict)
    page_ops: list[PageOps] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    # Swapped in by this step: moving them out again at once would only waste two copies.
    resumed: set[int] = field(default_factory=set)

    def add(self, seq: ScheduledSequence, copies: list[tuple[int, int]]) -> None:
        self.planned[seq.seq_id] = seq
        if copies:
            self.log("copy", copies)
        self.budget -= len(seq.input_token_ids)

    def log(self, kind: str, pairs: list[tuple[int, int]]) -> None:
        """Record page copies in the order the memory manager decided them."""
        if not pairs:
            return
        if self.page_ops and self.page_ops[-1].kind == kind:
            self.page_ops[-1].pairs.extend(pairs)
        else:
            self.page_ops.append(PageOps(kind, list(pairs)))

    def withdraw(self, seq_id: int) -> None:
        # Its logged copies stay: a later operation of this step may read their destination.
        seq = self.planned.pop(seq_id, None)
        if seq is not None:
            self.budget += len(seq.input_token_ids)

    def output(self, finished_seq_ids: list[int]) -> SchedulerOutput:
        return SchedulerOutput(sequences=list(self.planned.values()), page_ops=self.page_ops,
                               preempted_seq_ids=self.preempted, finished_seq_ids=finished_seq_ids)


def waiting_key(seq: Sequence) -> tuple[int, float, int]:
    return (seq.request.priority, seq.request.arrival_time, seq.seq_id)


def running_key(seq: Sequence) -> tuple[int, int, int]:
    return (seq.request.priority, seq.request.admit_rank or 0, seq.admit_order)


def ranks_before(request: Request, other: Request) -> bool:
    """Whether ``request`` was admitted before ``other`` (both admitted), priority first."""
    if request.admit_rank is None or other.admit_rank is None:
        return False
    return (request.priority, request.admit_rank) < (other.priority, other.admit_rank)


def is_parked(seq: Sequence) -> bool:
    """A beam that has given its next-token candidates and waits for its siblings'.

    It needs no pages until its group advances, so it is not resumed before
    that, and it is the first to yield pages within its request.
    """
    beam = seq.request.beam
    return beam is not None and seq.seq_id in beam.candidates
