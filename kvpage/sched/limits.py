"""The length rule: how many tokens a sequence may generate (pure Python).

A sequence stops by length when its output reaches ``max_tokens`` (or, with
``max_tokens=None``, fills ``max_model_len``), or when prompt and output
together reach ``max_model_len``.  Submission (a request that could never
finish is refused), the step results (a length stop, and the last token in
flight) and the planner's decode fast-forward all ask this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpage.sched.sequence import Sequence


@dataclass(frozen=True, slots=True)
class LengthLimit:
    max_model_len: int

    def max_new_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """Output tokens a request may generate: ``max_tokens``, or what ``max_model_len`` leaves."""
        return self.max_model_len - num_prompt_tokens if max_tokens is None else max_tokens

    def tokens_left(self, seq: Sequence, length: int) -> int:
        """Tokens ``seq`` may still generate once it has ``length`` tokens (0 or less: it stops by length)."""
        max_tokens = seq.request.sampling_params.max_tokens
        prompt, limit = seq.num_prompt_tokens, self.max_model_len
        # max_new_tokens, inlined: this runs twice for every sampling sequence of every step.
        max_out = limit - prompt if max_tokens is None else max_tokens
        return min(max_out - (length - prompt), limit - length)

    def reached(self, seq: Sequence, length: int) -> bool:
        """Whether a sequence of ``length`` tokens has generated all it may."""
        max_tokens = seq.request.sampling_params.max_tokens
        prompt, limit = seq.num_prompt_tokens, self.max_model_len
        max_out = limit - prompt if max_tokens is None else max_tokens  # tokens_left(...) <= 0, inlined
        return length - prompt >= max_out or length >= limit
