"""Sampling parameters of one request, validated on construction.

Field names and meanings follow vLLM's ``SamplingParams`` so that code written
for it ports unchanged. Every invalid value raises ``ValueError`` naming the
parameter, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from kvpage.validation import is_int, is_number, require

MAX_LOGPROBS = 20


class RequestOutputKind(Enum):
    """When ``LLMEngine.step`` reports a request (vLLM's names)."""

    CUMULATIVE = "cumulative"  # every step it produced tokens, with everything so far
    FINAL_ONLY = "final_only"  # once, when it finishes (what offline generate needs)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request.

    ``temperature == 0`` is greedy decoding. ``top_k`` of 0 or -1 and
    ``top_p == 1`` disable those filters. ``max_tokens=None`` generates until
    ``max_model_len``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    # The logprob of every prompt token after the first and of the top-k alternatives at its
    # position (RequestOutput.prompt_logprobs): None (off) or k in [0, MAX_LOGPROBS].
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Beam search: keep beam_width beams (default: n), return the best n; scores are
    # sum(logprobs) / generated_length ** length_penalty; early_stopping is True, False or "never",
    # as in transformers' generate().
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        require(is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        require(is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        require(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        require(is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1), "top_k", self.top_k,
                "-1 or 0 (disabled) or an integer >= 1")
        require(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        # A 64-bit seed: torch's generators take no more (and add the sample index to it).
        require(self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed", self.seed,
                "None or an integer in [-2**63, 2**63 - 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            require(is_number(value) and -2 <= value <= 2, name, value, "a number in [-2, 2]")
        require(is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
                self.repetition_penalty, "a number in (0, 10]")
        require(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
                self.max_tokens, "None or an integer >= 1")
        require(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None:
            require(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                    f"<= max_tokens ({self.max_tokens})")
        require(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                "logprobs", self.logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")
        require(self.prompt_logprobs is None or (is_int(self.prompt_logprobs)
                                                 and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
                "prompt_logprobs", self.prompt_logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stop:
            require(isinstance(s, str) and len(s) > 0, "stop", self.stop, "a non-empty string or a list of them")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        for t in ids:
            require(is_int(t) and t >= 0, "stop_token_ids", self.stop_token_ids, "a list of integers >= 0")
        self.stop_token_ids = ids
        require(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
                f"one of {[k.name for k in RequestOutputKind]}")
        self._check_beam_search()

    def _check_beam_search(self) -> None:
        require(isinstance(self.use_beam_search, bool), "use_beam_search", self.use_beam_search, "True or False")
        require(is_number(self.length_penalty), "length_penalty", self.length_penalty, "a number")
        require(self.early_stopping in (True, False, "never"), "early_stopping", self.early_stopping,
                "True, False or 'never'")
        if not self.use_beam_search:
            require(self.beam_width is None, "beam_width", self.beam_width, "None unless use_beam_search=True")
            return
        if self.beam_width is None:
            self.beam_width = self.n
        require(is_int(self.beam_width) and self.beam_width >= self.n, "beam_width", self.beam_width,
                f"an integer >= n ({self.n})")
        # Beam search is deterministic and scores raw log-probabilities: sampling knobs would be ignored.
        for name, neutral in (("temperature", 0.0), ("top_p", 1.0), ("min_p", 0.0), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0), ("repetition_penalty", 1.0), ("min_tokens", 0)):
            require(getattr(self, name) == neutral, name, getattr(self, name), f"{neutral} with use_beam_search")
        require(self.effective_top_k == 0, "top_k", self.top_k, "0 or -1 with use_beam_search")
        require(not self.stop_strings, "stop", self.stop, "None with use_beam_search (stop strings are not "
                "supported there; use stop_token_ids)")
        require(self.max_tokens is not None, "max_tokens", self.max_tokens, "set with use_beam_search")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def effective_top_k(self) -> int:
        """top_k with both disabled spellings mapped to 0."""
        return max(self.top_k, 0)
