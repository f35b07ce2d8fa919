"""What one engine step hands from the scheduler to the model runner, and back (pure Python).

These plain records are the only contract between the pure-Python side
(:mod:`kvpage.sched`, :mod:`kvpage.kv`) and the torch side
(:mod:`kvpage.worker`): the runner needs no scheduler object and the
scheduler no tensor.  The scheduler's answer for a step is a
:class:`SchedulerOutput`; the runner's, a :class:`SampledToken` per
sampling sequence and, for the sequences whose prompt positions the step
scores (``prompt_logprobs``), a :class:`PromptLogprobs` written into their
:class:`ScheduledSequence` when the step's results are read, before the
scheduler resolves the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvpage.sampling_params import SamplingParams

# Stands for a token sampled by the step still running on the device (asynchronous
# scheduling): the runner substitutes the real id on the device, from that step's output.
INFLIGHT_TOKEN = -1
# The prompt positions of a chunk that scores none (a range: immutable, so it can be shared).
NO_POSITIONS = range(0)


@dataclass(slots=True)
class PromptLogprobs:
    """The runner's scores of a run of prompt positions: the logits at position p score prompt token p + 1.

    Values are of the raw model distribution (``log_softmax`` of the logits,
    in float32), like sampled tokens' logprobs.  ``ranks`` are 1-based (1:
    the most likely token); ``top_ids`` / ``top_logprobs`` hold the k best
    tokens of each position, best first (empty lists when k is 0).
    """

    positions: range
    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def extend(self, later: PromptLogprobs) -> None:
        """Append the scores of the positions right after these."""
        if later.positions.start != self.positions.stop:
            raise RuntimeError(f"prompt logprobs of positions {later.positions} do not follow {self.positions}")
        self.positions = range(self.positions.start, later.positions.stop)
        self.token_logprobs += later.token_logprobs
        self.ranks += later.ranks
        self.top_ids += later.top_ids
        self.top_logprobs += later.top_logprobs


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step."""

    seq_id: int
    # Tokens whose K/V this step computes, at positions start_position, start_position + 1, ...
    # The last one may be INFLIGHT_TOKEN.
    input_token_ids: list[int]
    start_position: int
    page_ids: list[int]
    # True when this step reaches the end of the known tokens, so the last
    # position's logits are sampled into a new token.
    sample: bool
    sampling_params: SamplingParams
    sample_index: int
    # The whole stream (shared, not copied): penalties read the prompt and the output.
    all_token_ids: list[int]
    num_prompt_tokens: int
    # Prompt logprobs: the positions of this chunk whose logits score the prompt token after them
    # (kvpage.sched.prompt_logprobs decides which), and the runner's scores of them, written
    # when the step's results are read.
    prompt_logprob_positions: range = NO_POSITIONS
    prompt_logprobs: PromptLogprobs | None = None


class PageOpKind(str, Enum):
    """What a page operation copies, and between which memories."""

    COPY = "copy"  # (source, destination) device pages: copy-on-write and contiguous forks
    SWAP_OUT = "swap_out"  # (device page, host page)
    SWAP_IN = "swap_in"  # (host page, device page)


@dataclass(slots=True)
class PageOps:
    """A run of page operations of one kind, as (from, to) page pairs."""

    kind: PageOpKind
    pairs: list[tuple[int, int]]


@dataclass
class SchedulerOutput:
    """What one step runs: its sequences, the page operations before it, and the sequences that left."""

    sequences: list[ScheduledSequence] = field(default_factory=list)
    # Page copies, performed before the forward pass in exactly this order: the scheduler
    # reuses a page freed by an earlier operation of the same step (a swapped-out device
    # page for a swap-in, a swapped-in host page for a later swap-out).
    page_ops: list[PageOps] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)
    # Sequences that ended since the last step: the runner drops their per-sequence state.
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.input_token_ids) for s in self.sequences)

    def pairs(self, kind: PageOpKind) -> list[tuple[int, int]]:
        """Every pair of one kind of operation, in order."""
        return [pair for ops in self.page_ops if ops.kind == kind for pair in ops.pairs]

    @property
    def is_empty(self) -> bool:
        """Nothing to run and nothing to copy: no device work at all."""
        return not self.sequences and not self.page_ops

    def can_overlap(self) -> bool:
        """Whether the next step can be scheduled and sampled without this step's token ids on the host.

        Penalties and ``min_tokens`` read a sequence's output tokens when
        sampling, and beam search forks on the candidates; with asynchronous
        scheduling those steps are waited for.
        """
        for seq in self.sequences:
            if seq.sample:
                params = seq.sampling_params
                if params.use_beam_search or params.has_penalties or params.min_tokens:
                    return False
        return True


@dataclass(slots=True)
class SampledToken:
    """The runner's answer for one sampled sequence."""

    token_id: int
    # {token id: logprob} of the sampled token plus the top-k, when logprobs were asked for.
    logprobs: dict[int, float] | None = None
    # Beam search: the sequence's best next tokens and their log-probabilities, best first.
    beam_candidates: list[tuple[int, float]] | None = None
