"""Prompt logprobs: which prompt positions each step scores, and the prefix-cache rule (pure Python).

A request with ``SamplingParams.prompt_logprobs`` wants, for every prompt
token after the first, its logprob given the tokens before it (what
log-likelihood evaluation and perplexity read).  The logits at position
``p`` score prompt token ``p + 1``, so a prompt of ``P`` tokens is scored at
positions ``0 .. P - 2``; position ``P - 1``'s logits sample the first
output token, as for any request.

Positions are scored by the steps that compute them, chunk by chunk
(chunked prefill), and the request counts the positions whose scoring a
committed step has launched (``Request.num_prompt_positions_scored``), so:

* each position is scored exactly once: a chunk scores only positions past
  that count, so the recompute of a preempted sequence, or the sibling
  samples of ``n > 1`` (forked once the parent has computed positions
  ``0 .. P - 2``), score nothing twice, and the request gets one list;
* **the prefix-cache rule**: a sequence whose request still has prompt
  positions to score does not read the prefix cache (it is neither a query
  nor a hit in the cache's counters).  A cached page's K/V is reused, never
  computed, so its positions would get no logits; the request computes its
  whole prompt instead (vLLM v1's rule).  It still fills the cache for
  others, and once its prompt is scored (a recompute after a preemption in
  the decode phase) it reads the cache like any request.
"""

from __future__ import annotations

from kvpage.sched.sequence import Request, Sequence
from kvpage.step_io import NO_POSITIONS, PromptLogprobs, ScheduledSequence


def reads_prefix_cache(seq: Sequence) -> bool:
    """Whether ``seq`` may start from a prefix-cache hit: not while its prompt has positions to score."""
    request = seq.request
    return (request.sampling_params.prompt_logprobs is None
            or request.num_prompt_positions_scored >= seq.num_prompt_tokens - 1)


def positions_to_score(seq: Sequence, start: int, end: int) -> range:
    """The positions of the chunk ``[start, end)`` that score a prompt token not scored yet."""
    request = seq.request
    if request.sampling_params.prompt_logprobs is None:
        return NO_POSITIONS
    scored, last = request.num_prompt_positions_scored, seq.num_prompt_tokens - 1
    if scored >= last or end <= scored:
        return NO_POSITIONS
    if start > scored:  # reads_prefix_cache keeps a sequence from skipping positions
        raise RuntimeError(f"sequence {seq.seq_id} computes from position {start} but its prompt is scored "
                           f"only up to position {scored}: prompt logprobs would be lost")
    return range(scored, min(end, last))


def on_commit(seq: Sequence, scheduled: ScheduledSequence) -> None:
    """A committed step scores ``scheduled``'s prompt positions: later chunks start after them."""
    positions = scheduled.prompt_logprob_positions
    if positions:
        seq.request.num_prompt_positions_scored = positions.stop


def on_resolve(seq: Sequence, scheduled: ScheduledSequence) -> None:
    """The scores of a resolved step's prompt positions join the request's, in position order."""
    if not scheduled.prompt_logprob_positions:
        return
    scores = scheduled.prompt_logprobs
    if scores is None or scores.positions != scheduled.prompt_logprob_positions:
        raise ValueError(f"sequence {seq.seq_id} was to score prompt positions "
                         f"{scheduled.prompt_logprob_positions} and came back with "
                         f"{None if scores is None else scores.positions}")
    request = seq.request
    if request.prompt_scores is None:
        if scores.positions.start != 0:
            raise RuntimeError(f"prompt logprobs of {request.request_id!r} start at position {scores.positions.start}")
        request.prompt_scores = PromptLogprobs(range(0), [], [], [], [])
    request.prompt_scores.extend(scores)


def is_scored(request: Request) -> bool:
    """Whether every prompt position of ``request`` has its scores (true when none are asked for)."""
    if request.sampling_params.prompt_logprobs is None:
        return True
    done = request.prompt_scores.positions.stop if request.prompt_scores is not None else 0
    return done >= len(request.prompt_token_ids) - 1
