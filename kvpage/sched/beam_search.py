"""A beam search step as sequence events (pure Python).

:class:`~kvpage.sched.beam.BeamGroup` decides which beams continue; this
module applies its choice to the request's sequences: a beam chosen once is
extended in place, a beam chosen again is forked (its pages shared,
copy-on-write), and a beam not chosen is freed at once.
"""

from __future__ import annotations

from kvpage.sched.lifecycle import Lifecycle
from kvpage.sched.sequence import Request, Sequence, SequenceStatus


def advance_beams(life: Lifecycle, request: Request) -> list[Sequence]:
    """One beam step: fork the beams chosen twice, extend the chosen, free the rest.

    Returns a sequence of the request when the search is over (so that its
    output is reported), else nothing: beams report only their final result.
    """
    group = request.beam
    if group is None:
        raise ValueError(f"request {request.request_id!r} is not a beam search")
    live = life.queues.live
    beams = {seq_id: live[seq_id] for seq_id, _ in group.running}
    choices = group.step({seq_id: seq.output_token_ids for seq_id, seq in beams.items()})
    life.counters.num_generated_tokens += len(choices)
    if group.done:
        for seq in beams.values():
            life.finish(seq, SequenceStatus.FINISHED_STOPPED)
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
            life.finish(seq, SequenceStatus.FINISHED_ABORTED)  # pruned: its pages go back
    # A child shares its parent's pages and takes its place in the running order; if the parent is
    # preempted, or a contiguous layout has no room, the child waits and recomputes.
    children = [life.fork(parent, [*parent.token_ids, token_id], fresh_order=False) for parent, token_id in forks]
    for seq_id, token_id in extended.items():
        beams[seq_id].append_token(token_id, None)
    child_ids = iter(c.seq_id for c in children)
    group.running = [(next(child_ids) if slot is None else slot, c.score) for slot, c in zip(slots, choices)]
    return []
