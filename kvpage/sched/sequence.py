"""Requests and the sequences the scheduler runs for them.

A :class:`Request` is what a caller submits: one prompt and its sampling
parameters. A :class:`Sequence` is one stream of tokens the scheduler batches:
a request with ``n`` parallel samples runs ``n`` sequences. Only the first one
exists at submission; it prefills all prompt tokens but the last and is then
*forked*: the siblings share its pages (copy-on-write) and each computes the
last prompt token itself, so each gets its own logits and random stream.

Life of a sequence (:data:`TRANSITIONS`; only
:meth:`kvpage.sched.queues.SequenceQueues.move` changes a status)::

    WAITING ──admit──> RUNNING ──stop / length / abort──> FINISHED_*
       ^                │   ^
       └── preempt ─────┘   │ swap in          (recompute: pages freed, recomputed on return)
                        v   │
                       SWAPPED                 (swap: pages copied to host memory and back)

Any unfinished sequence may be aborted.  A sequence that finished by EOS or
length in a step whose text also completes a stop string is restated as
stopped (the stop string wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvpage.sampling_params import SamplingParams
from kvpage.sched.beam import BeamGroup
from kvpage.step_io import PromptLogprobs


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its K/V in host memory
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset((SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                             SequenceStatus.FINISHED_ABORTED))
# Allowed moves: every transition of a sequence's status is one of these.
TRANSITIONS: dict[SequenceStatus, frozenset[SequenceStatus]] = {
    SequenceStatus.WAITING: frozenset({SequenceStatus.RUNNING}) | FINISHED_STATES,
    SequenceStatus.RUNNING: frozenset({SequenceStatus.WAITING, SequenceStatus.SWAPPED}) | FINISHED_STATES,
    SequenceStatus.SWAPPED: frozenset({SequenceStatus.RUNNING}) | FINISHED_STATES,
    SequenceStatus.FINISHED_STOPPED: frozenset({SequenceStatus.FINISHED_STOPPED}),
    SequenceStatus.FINISHED_LENGTH: frozenset({SequenceStatus.FINISHED_STOPPED}),
    SequenceStatus.FINISHED_ABORTED: frozenset(),
}
FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class RequestTimes:
    """Wall-clock marks for latency metrics (seconds, time.monotonic)."""

    arrival: float
    scheduled: float | None = None  # first admitted to the running batch
    first_token: float | None = None
    finished: float | None = None


@dataclass(eq=False)
class Sequence:
    """One token stream: the prompt followed by what has been generated so far."""

    seq_id: int
    request: Request
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose K/V is in the cache; the token after them is the next input.
    num_computed_tokens: int = 0
    # Highest num_computed_tokens ever reached; work below it after a preemption is recomputation.
    max_computed_tokens: int = 0
    admit_order: int = 0
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    stop_reason: int | str | None = None
    # Per output token: {token id: logprob} of the sampled token and the top-k.
    output_logprobs: list[dict[int, float]] | None = None
    # Tokens sampled by steps still running on the device (asynchronous scheduling): they count
    # toward the sequence's length, so the next step can be planned, but their ids are not known yet.
    num_inflight_tokens: int = 0
    # The token in flight is the last one by length: nothing more is scheduled for this sequence.
    last_token_inflight: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATES

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    @property
    def compute_target(self) -> int:
        """How many tokens' K/V this sequence should have once it has caught up.

        A parent awaiting its fork stops one short of the prompt: the siblings
        and the parent each compute the last prompt token themselves.
        """
        if self.request.num_pending_forks and self.sample_index == 0:
            return self.num_prompt_tokens - 1
        if self.last_token_inflight:
            return len(self.token_ids)
        return len(self.token_ids) + self.num_inflight_tokens

    def append_token(self, token_id: int, logprobs: dict[int, float] | None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            if self.output_logprobs is None:
                self.output_logprobs = []
            self.output_logprobs.append(logprobs)


@dataclass(eq=False)
class Request:
    """A caller's request: one prompt, its parameters, and the sequences serving it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    sequences: list[Sequence] = field(default_factory=list)
    num_pending_forks: int = 0
    # Kept by the scheduler so that "is the request done?" costs O(1) per step.
    num_unfinished_seqs: int = 0
    times: RequestTimes | None = None
    beam: BeamGroup | None = None  # beam search state, for use_beam_search requests
    # Order of first admission, kept through preemptions: among equal priorities the
    # request admitted first is the last to yield pages, so the oldest always progresses.
    admit_rank: int | None = None
    # Prompt logprobs (kvpage.sched.prompt_logprobs): prompt positions scored by committed steps,
    # and the scores that have arrived, in position order. Per request: n samples share one prompt.
    num_prompt_positions_scored: int = 0
    prompt_scores: PromptLogprobs | None = None

    @property
    def is_finished(self) -> bool:
        return self.num_pending_forks == 0 and self.num_unfinished_seqs == 0

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens
