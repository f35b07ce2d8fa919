"""The scheduler's book of sequences: who waits, who runs, who is swapped out (pure Python).

Every unfinished sequence is in exactly one queue, the one its status
names: *waiting* (to be admitted, or recomputed after a preemption),
*running* (its K/V in device pages) or *swapped* (its pages copied to host
memory).  :class:`SequenceQueues` keeps that rule alone: it is the only
code that writes a sequence's status or queue membership, through one
transition function, :meth:`SequenceQueues.move`, which refuses a move that
:data:`~kvpage.sched.sequence.TRANSITIONS` does not allow.  What a move
means for pages and promises is :mod:`kvpage.sched.lifecycle`'s business.

Queues are kept sorted: the waiting queue by priority, then arrival; the
running and swapped queues by priority, then the order in which requests
were first admitted (kept through preemptions), then the order in which
sequences joined.  The last running sequence is the next to be preempted,
so the oldest request is the last to lose pages and always progresses.
"""

from __future__ import annotations

import bisect

from kvpage.sched.sequence import TRANSITIONS, Request, Sequence, SequenceStatus


def waiting_key(seq: Sequence) -> tuple[int, float, int]:
    return (seq.request.priority, seq.request.arrival_time, seq.seq_id)


def running_key(seq: Sequence) -> tuple[int, int, int]:
    return (seq.request.priority, seq.request.admit_rank or 0, seq.admit_order)


class SequenceQueues:
    """The waiting, running and swapped sequences of every unfinished request, and their statuses."""

    def __init__(self) -> None:
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # preempted to host memory, resumed before any admission
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.live: dict[int, Sequence] = {}  # unfinished sequences by id, in any queue
        # Bumped whenever a sequence joins or leaves the waiting queue: what is computed from that queue
        # (the smallest pending reservation, for external fragmentation) stays valid while it holds.
        self.waiting_version = 0
        self._next_seq_id = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request

    def remove_request(self, request_id: str) -> Request | None:
        """Forget an unfinished request (it is being aborted); its sequences are finished one by one."""
        return self.requests.pop(request_id, None)

    def new_sequence(self, request: Request, token_ids: list[int], status: SequenceStatus,
                     admit_order: int = 0) -> Sequence:
        """A new sequence of ``request`` (its next sample index), put in the queue of ``status`` at once."""
        if status not in (SequenceStatus.WAITING, SequenceStatus.RUNNING):
            raise ValueError(f"a new sequence starts waiting or running, not {status.value}")
        seq = Sequence(seq_id=self._next_seq_id, request=request, sample_index=len(request.sequences),
                       token_ids=token_ids, num_prompt_tokens=len(request.prompt_token_ids), status=status,
                       admit_order=admit_order)
        self._next_seq_id += 1
        request.sequences.append(seq)
        request.num_unfinished_seqs += 1
        self.live[seq.seq_id] = seq
        self._insert(seq)
        return seq

    def move(self, seq: Sequence, to: SequenceStatus) -> None:
        """The one transition function: change ``seq``'s status and put it in that status's queue.

        A sort key (admission order, rank) must be set before the move:
        the target queue is ordered on insertion.
        """
        current = seq.status
        if to not in TRANSITIONS[current]:
            raise RuntimeError(f"sequence {seq.seq_id} cannot go from {current.value} to {to.value}")
        if current.is_finished:  # a finish restated (a stop string wins over EOS or length): no queue
            seq.status = to
            return
        if current is SequenceStatus.WAITING:
            self.waiting_version += 1
        self._queue(current).remove(seq)
        seq.status = to
        if not to.is_finished:
            self._insert(seq)
            return
        del self.live[seq.seq_id]
        request = seq.request
        request.num_unfinished_seqs -= 1
        if request.is_finished:
            self.requests.pop(request.request_id, None)

    def _queue(self, status: SequenceStatus) -> list[Sequence]:
        if status is SequenceStatus.RUNNING:
            return self.running
        if status is SequenceStatus.WAITING:
            return self.waiting
        if status is SequenceStatus.SWAPPED:
            return self.swapped
        raise RuntimeError(f"a {status.value} sequence is in no queue")

    def _insert(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.WAITING:
            self.waiting_version += 1
            bisect.insort(self.waiting, seq, key=waiting_key)
        else:
            bisect.insort(self._queue(seq.status), seq, key=running_key)
