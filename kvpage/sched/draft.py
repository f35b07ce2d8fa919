"""The step being scheduled, before it is handed out (pure Python).

A :class:`StepDraft` collects what one call of ``Scheduler.schedule``
decides: the sequences that run and the page operations (swaps and
copies) that must happen before the forward pass, in the order the memory
manager decided them, since a page freed by one operation may serve the
next.  :meth:`StepDraft.output` turns it into the
:class:`~kvpage.step_io.SchedulerOutput` the runner receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpage.step_io import PageOpKind, PageOps, ScheduledSequence, SchedulerOutput


@dataclass
class StepDraft:
    """The step being scheduled: sequences, their page operations, the token budget left."""

    budget: int
    scheduled: dict[int, ScheduledSequence] = field(default_factory=dict)
    page_ops: list[PageOps] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    # Swapped in by this step: moving them out again at once would only waste two copies.
    resumed: set[int] = field(default_factory=set)

    def add(self, seq: ScheduledSequence, copies: list[tuple[int, int]]) -> None:
        self.scheduled[seq.seq_id] = seq
        if copies:
            self.log(PageOpKind.COPY, copies)
        self.budget -= len(seq.input_token_ids)

    def log(self, kind: PageOpKind, pairs: list[tuple[int, int]]) -> None:
        """Record page operations in the order the memory manager decided them."""
        if not pairs:
            return
        if self.page_ops and self.page_ops[-1].kind is kind:
            self.page_ops[-1].pairs.extend(pairs)
        else:
            self.page_ops.append(PageOps(kind, list(pairs)))

    def withdraw(self, seq_id: int) -> None:
        # Its logged copies stay: a later operation of this step may read their destination.
        seq = self.scheduled.pop(seq_id, None)
        if seq is not None:
            self.budget += len(seq.input_token_ids)

    def output(self, finished_seq_ids: list[int]) -> SchedulerOutput:
        return SchedulerOutput(sequences=list(self.scheduled.values()), page_ops=self.page_ops,
                               preempted_seq_ids=self.preempted, finished_seq_ids=finished_seq_ids)
