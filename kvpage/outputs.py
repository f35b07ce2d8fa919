"""What the engine returns: one :class:`RequestOutput` per request, vLLM's shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
    metrics: RequestMetrics | None = field(default=None, repr=False)
