"""What the engine returns: one :class:`RequestOutput` per request, vLLM's shape.

Logprobs, of sampled tokens (``CompletionOutput.logprobs``) and of prompt
tokens (``RequestOutput.prompt_logprobs``), are one shape: per position a
dict ``{token id: logprob}`` holding the position's actual token and the
top-k alternatives, its actual token first.  The prompt's values are
:class:`Logprob` objects: floats that also carry vLLM's ``logprob``,
``rank`` and ``decoded_token`` attributes, so code written for either reads
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Logprob(float):
    """A token's log-probability (the float itself), its rank and its text: vLLM's ``Logprob`` record.

    ``rank`` is 1 for the most likely token (1 + the number of tokens more
    likely than it); ``decoded_token`` is the token alone, decoded (None
    without a tokenizer).
    """

    __slots__ = ("rank", "decoded_token")
    rank: int | None
    decoded_token: str | None

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None) -> Logprob:
        record = super().__new__(cls, logprob)
        record.rank = rank
        record.decoded_token = decoded_token
        return record

    @property
    def logprob(self) -> float:
        return float(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return Logprob, (float(self), self.rank, self.decoded_token)

    def __str__(self) -> str:
        return float.__repr__(self)  # printed as the number it is

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


# vLLM's PromptLogprobs: one entry per prompt token; the first is None (nothing precedes it).
PromptLogprobs = list[dict[int, Logprob] | None]


class CompletionOutput:
    """One generated sequence of a request.

    ``text`` is decoded on first access, so a step that nobody reads the text
    of pays nothing for detokenization.
    """

    __slots__ = ("index", "token_ids", "finish_reason", "stop_reason", "logprobs", "_text", "_decode")

    def __init__(self, index: int, token_ids: list[int], finish_reason: str | None,
                 stop_reason: int | str | None, logprobs: list[dict[int, float]] | None,
                 text: str | Callable[[], str]) -> None:
        self.index = index
        self.token_ids = token_ids
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.logprobs = logprobs
        self._text: str | None = text if isinstance(text, str) else None
        self._decode = None if isinstance(text, str) else text

    @property
    def text(self) -> str:
        if self._text is None:
            assert self._decode is not None
            self._text = self._decode()
        return self._text

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the sampled tokens' logprobs (only when logprobs were asked for)."""
        if self.logprobs is None:
            return None
        return sum(entry[token] for token, entry in zip(self.token_ids, self.logprobs))

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})")


@dataclass
class RequestMetrics:
    """Latencies of one request in seconds (None until known)."""

    arrival_time: float
    queue_time: float | None = None  # arrival until first scheduled
    time_to_first_token: float | None = None
    e2e_latency: float | None = None


@dataclass
class RequestOutput:
    """The state of a request after a step: its prompt and one output per sample."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: per prompt token, {token id: Logprob} of the token and the top-k.
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = field(default=None, repr=False)
