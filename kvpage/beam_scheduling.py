"""Beam search steps as page operations (pure Python).

:class:`~kvpage.beam.BeamGroup` decides which beams continue; this module
applies its choice to the scheduler's sequences: a beam chosen once is
extended in place, a beam chosen again is forked (its pages shared,
copy-on-write), and a beam not chosen is freed at once.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from kvpage.request import Request, Sequence, SequenceStatus
from kvpage.step_plan import running_key, waiting_key

if TYPE_CHECKING:
    from kvpage.sequence_queues import SequenceQueues


def advance_beams(sched: SequenceQueues, request: Request) -> list[Sequence]:
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
    # Parents are extended in place; a beam chosen again is forked, one not chosen is freed first,
    # so that (in the contiguous layouts) its reservation can serve a fork.
    extended: dict[int, int] = {}
    forks: list[tuple[Sequence, int]] = []
    slots: list[int | None] = []  # per choice: the parent's id if extended, None if forked
    for choice in choices:
        if choice.parent_seq_id in extended:
            forks.append((beams[choice.parent_seq_id], choice.token_id))
            slots.append(None)
        else:
            extended[choice.parent_seq_id] = choice.token_id
            slots.append(choice.parent_seq_id)
    for seq_id, seq in beams.items():
        if seq_id not in extended:
            sched.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)  # pruned: its pages go back
    children = []
    for parent, token_id in forks:
        child = sched.new_sequence(request, len(request.sequences), list(parent.token_ids))
        child.append_token(token_id, None)
        if parent.status is SequenceStatus.RUNNING and sched.kv.can_fork(parent.seq_id):
            sched.kv.fork(parent.seq_id, child.seq_id)  # shares every page; the last one copy-on-write
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
            child.admit_order = parent.admit_order
            bisect.insort(sched.running, child, key=running_key)
        else:  # its parent is preempted, or there is no contiguous room: the child waits and recomputes
            bisect.insort(sched.waiting, child, key=waiting_key)
        children.append(child)
    for seq_id, token_id in extended.items():
        beams[seq_id].append_token(token_id, None)
    child_ids = iter(c.seq_id for c in children)
    group.running = [(next(child_ids) if slot is None else slot, c.score) for slot, c in zip(slots, choices)]
    return []
