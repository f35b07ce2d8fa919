"""The logprobs objects of the API's responses, from the engine loop's token strings.

Three shapes: the legacy ``logprobs`` object of ``/v1/completions``
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``; with
``echo``, the prompt's tokens first, the first of them with null logprob and
alternatives, as OpenAI's legacy API returned them), the chat endpoint's
``logprobs.content``, and vLLM's ``prompt_logprobs`` field (per prompt
token, ``{token id: {logprob, rank, decoded_token}}``).
"""

from __future__ import annotations

from typing import Any

from kvpage.outputs import Logprob, PromptLogprobs
from kvpage.server.async_engine import PromptDelta, TokenLogprob


def completion_logprobs(entries: list[TokenLogprob], offset: int, prompt: PromptDelta | None = None,
                        prompt_top: int = 0) -> dict[str, Any]:
    """The legacy ``logprobs`` object; with ``prompt`` (echo), the prompt's tokens come first.

    As in OpenAI's legacy API, the first prompt token has no logprob and no
    alternatives (null); prompt tokens' offsets count from the start of the
    text, the completion's from ``offset``.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if prompt is not None:
        position = 0
        for token in prompt.tokens:
            offsets.append(position)
            position += len(token)
        tokens += prompt.tokens
        token_logprobs += [None] + [e.logprob for e in prompt.entries]
        top_logprobs += [None] + [dict(e.top[:prompt_top]) for e in prompt.entries]
    position = offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    tokens += [e.token for e in entries]
    token_logprobs += [e.logprob for e in entries]
    top_logprobs += [dict(e.top) for e in entries]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def vllm_prompt_logprobs(raw: PromptLogprobs, k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` field: per prompt token, {token id: logprob, rank, text} of it and its top k."""
    def record(lp: Logprob) -> dict[str, Any]:
        return {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
    return [None if entry is None else {  # the prompt token first, then the alternatives of rank <= k
        str(tid): record(lp) for j, (tid, lp) in enumerate(entry.items()) if j == 0 or (lp.rank or 0) <= k}
        for entry in raw]


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}
