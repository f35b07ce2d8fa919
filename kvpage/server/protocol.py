"""Request and response schemas of the OpenAI-compatible API, as pydantic models.

Requests are validated strictly: a string where a number belongs, or a
number out of range, is a 400 error naming the field, never a silent
coercion.  Fields OpenAI lacks but vLLM accepts (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ...) are ordinary
optional fields, so the official client passes them through ``extra_body``.
Unknown fields are ignored, as OpenAI does, and logged.

:func:`to_sampling_params` maps a request onto :class:`SamplingParams`,
which checks the values themselves; this module checks only shapes and the
server's own bounds (:class:`ServerLimits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvpage.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams

TokenIds = list[Annotated[int, Field(ge=0)]]


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one HTTP request may ask for (beyond the engine's own checks)."""

    max_body_bytes: int = 1 << 20
    max_n: int = 16
    max_stop_strings: int = 16
    max_prompts: int = 64  # prompts in one /v1/completions request


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Sampling fields shared by both endpoints (OpenAI's names, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    # vLLM extra: the prompt tokens' logprobs in vLLM's shape, in each choice's "prompt_logprobs"
    prompt_logprobs: int | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: TokenIds


class RequestError(ValueError):
    """A request the server refuses: becomes a 4xx OpenAI error naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def message_text(message: ChatMessage) -> str:
    """The text of a chat message; content parts other than text are refused."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages: only text content parts are supported, got {part.get('type')!r}",
                               "messages")
        texts.append(part["text"])
    return "".join(texts)


def check_logprobs_count(name: str, value: int | None) -> None:
    """A count of logprobs alternatives (``logprobs``, ``prompt_logprobs``): None or in [0, MAX_LOGPROBS]."""
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value}", name)


def to_sampling_params(request: CompletionRequest | ChatCompletionRequest, limits: ServerLimits,
                       max_tokens: int | None, logprobs: int | None,
                       prompt_logprobs: int | None = None) -> SamplingParams:
    """Map the request's fields onto SamplingParams; ValueError names the offending field."""
    if not 1 <= request.n <= limits.max_n:
        raise RequestError(f"n must be an integer in [1, {limits.max_n}], got {request.n}", "n")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > limits.max_stop_strings:
        raise RequestError(f"stop has {len(stops)} strings; at most {limits.max_stop_strings} are allowed", "stop")
    check_logprobs_count("logprobs", logprobs)
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    try:
        return SamplingParams(
            n=request.n, temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p, top_k=request.top_k or 0,
            min_p=request.min_p, seed=request.seed, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
            stop=stops or None, stop_token_ids=request.stop_token_ids,
            include_stop_str_in_output=request.include_stop_str_in_output, ignore_eos=request.ignore_eos,
            max_tokens=max_tokens, min_tokens=request.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens, output_kind=RequestOutputKind.CUMULATIVE)
    except ValueError as exc:
        message = str(exc)
        raise RequestError(message, message.split(" ", 1)[0]) from None


def error_body(message: str, error_type: str, param: str | None = None, code: str | int | None = None
               ) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
