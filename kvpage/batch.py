"""What one engine step hands from the scheduler to the model runner, and back.

These plain records are the only contract between the pure-Python side
(scheduler, memory manager) and the torch side (worker): the runner needs no
scheduler object and the scheduler no tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpage.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step."""

    seq_id: int
    # Tokens whose K/V this step computes, at positions start_position, start_position + 1, ...
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


@dataclass
class SchedulerOutput:
    """The plan of one step."""

    sequences: list[ScheduledSequence] = field(default_factory=list)
    # (src, dst) page copies for copy-on-write, performed before the forward pass.
    page_copies: list[tuple[int, int]] = field(default_factory=list)
    # (device page, host page) copies of swapped-out sequences, then (host page, device page) of
    # swapped-in ones: performed first, in that order, since freed pages may be reused this step.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)
    # Sequences that ended since the last step: the runner drops their per-sequence state.
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.input_token_ids) for s in self.sequences)


@dataclass(slots=True)
class SampledToken:
    """The runner's answer for one sampled sequence."""

    token_id: int
    # {token id: logprob} of the sampled token plus the top-k, when logprobs were asked for.
    logprobs: dict[int, float] | None = None
    # Beam search: the sequence's best next tokens and their log-probabilities, best first.
    beam_candidates: list[tuple[int, float]] | None = None
