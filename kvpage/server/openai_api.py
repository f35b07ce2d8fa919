"""The two generation endpoints, ``/v1/completions`` and ``/v1/chat/completions``.

Each prompt of a request becomes one engine request with ``n`` samples;
choice ``i * n + j`` is sample ``j`` of prompt ``i``, as OpenAI numbers them.
All engine requests are submitted (and validated) before the response
starts, so a bad request is a 400, never a broken stream.  A stream that the
client drops cancels the fan-in tasks, and each task's handle aborts its
engine request.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from kvpage.engine import LLMEngine, PromptInput
from kvpage.sampling_params import SamplingParams
from kvpage.server.async_engine import (
    AsyncEngine,
    CompletionDelta,
    PromptDelta,
    RequestHandle,
    StreamDelta,
    TokenLogprob,
)
from kvpage.server.logprob_json import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from kvpage.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    ServerLimits,
    check_logprobs_count,
    error_body,
    message_text,
    to_sampling_params,
)


@dataclass(frozen=True)
class ApiContext:
    engine: AsyncEngine
    model_name: str
    limits: ServerLimits


def engine_error_param(message: str) -> str | None:
    """Which request field an engine ValueError is about, judged from its wording."""
    words = set(re.findall(r"[a-z_]+", message))
    if "max_tokens" in words:  # "prompt (..) + max_tokens (..) exceeds max_model_len": the ask is too big
        return "max_tokens"
    first = message.split(" ", 1)[0]
    if first in ("prompt", "prompt_token_ids"):
        return "prompt"
    return first if first in ("n", "stop", "stop_token_ids", "priority", "logprobs") else None


async def submit_all(ctx: ApiContext, prompts: Sequence[PromptInput], params: SamplingParams,
                     priority: int) -> list[RequestHandle]:
    handles: list[RequestHandle] = []
    try:
        for prompt in prompts:
            handles.append(await ctx.engine.submit(prompt, params, priority=priority))
    except ValueError as exc:
        for handle in handles:
            ctx.engine.abort(handle.request_id)
        if isinstance(exc, RequestError):
            raise
        raise RequestError(str(exc), engine_error_param(str(exc))) from None
    except BaseException:
        for handle in handles:
            ctx.engine.abort(handle.request_id)
        raise
    return handles


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """Deltas of every handle as they come, tagged with the prompt index."""
    queue: asyncio.Queue[tuple[int, StreamDelta | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for delta in handle.deltas():
                await queue.put((i, delta))
            await queue.put((i, None))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


Disconnected = Callable[[], Awaitable[bool]]


class ClientGone(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


async def collect(handles: list[RequestHandle], is_disconnected: Disconnected, poll_s: float = 0.25
                  ) -> list[tuple[int, StreamDelta]]:
    """Every delta of the handles; cancelled (so the requests are aborted) if the client leaves."""
    async def gather() -> list[tuple[int, StreamDelta]]:
        return [item async for item in merged(handles)]

    task = asyncio.create_task(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Usage:
    def __init__(self, count_completion: bool = True) -> None:
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.completion: dict[int, int] = {}
        self.count_completion = count_completion  # False for prompt-only (max_tokens=0) requests

    def add(self, i: int, delta: StreamDelta) -> None:
        self.prompt[i] = delta.num_prompt_tokens
        self.cached[i] = delta.num_cached_tokens
        self.completion[i] = delta.num_generated_tokens if self.count_completion else 0

    def as_dict(self) -> dict[str, Any]:
        prompt, completion = sum(self.prompt.values()), sum(self.completion.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


# ----- /v1/completions ---------------------------------------------------------------
def completion_prompts(request: CompletionRequest, limits: ServerLimits) -> list[str | dict[str, Any]]:
    prompt = request.prompt
    prompts: list[str | dict[str, Any]] = []
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [{"prompt_token_ids": list(prompt)}]
    else:
        for p in prompt:
            if isinstance(p, int):  # the schema admits no list mixing token ids with prompts
                raise RequestError("prompt must be a string, a list of strings, a list of token ids, or a list "
                                   "of token id lists", "prompt")
            prompts.append(p if isinstance(p, str) else {"prompt_token_ids": list(p)})
    if not prompts:
        raise RequestError("prompt must not be empty", "prompt")
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"prompt is a list of {len(prompts)} prompts; at most {limits.max_prompts} are "
                           "allowed in one request", "prompt")
    return prompts


@dataclass(frozen=True)
class EchoPlan:
    """What a completion request asks about its prompt: echo, its logprobs, and whether to generate at all."""

    echo: bool
    legacy_logprobs: int | None  # echo with logprobs: the prompt's logprobs in the legacy object
    vllm_logprobs: int | None  # vLLM's prompt_logprobs field
    prompt_only: bool  # echo with max_tokens=0: the prompt's text and logprobs, nothing generated

    @classmethod
    def of(cls, request: CompletionRequest) -> EchoPlan:
        if request.max_tokens == 0 and not request.echo:
            raise RequestError("max_tokens must be at least 1 unless echo is true (max_tokens=0 with echo returns "
                               "the prompt and its logprobs alone), got 0", "max_tokens")
        check_logprobs_count("logprobs", request.logprobs)
        check_logprobs_count("prompt_logprobs", request.prompt_logprobs)
        legacy = request.logprobs if request.echo else None
        return cls(request.echo, legacy, request.prompt_logprobs, request.echo and request.max_tokens == 0)

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """What the engine computes: enough alternatives for both views."""
        asks = [k for k in (self.legacy_logprobs, self.vllm_logprobs) if k is not None]
        return max(asks) if asks else None


async def echo_texts(ctx: ApiContext, prompts: Sequence[str | dict[str, Any]]) -> list[str]:
    """Each prompt's text: as given, or its token ids decoded."""
    def text(engine: LLMEngine, prompt: str | dict[str, Any]) -> str:
        if isinstance(prompt, str):
            return prompt
        return engine.tokenizer.decode(prompt["prompt_token_ids"]) if engine.tokenizer is not None else ""
    return await ctx.engine.call(lambda engine: [text(engine, p) for p in prompts])


async def create_completion(ctx: ApiContext, request: CompletionRequest, is_disconnected: Disconnected) -> Any:
    if request.suffix is not None:
        raise RequestError("suffix is not supported", "suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise RequestError(f"best_of must equal n ({request.n}) or be omitted, got {request.best_of}", "best_of")
    plan = EchoPlan.of(request)
    prompts = completion_prompts(request, ctx.limits)
    # A prompt-only request samples one token (the prompt's last logits are computed anyway) and drops it.
    params = to_sampling_params(request, ctx.limits, 1 if plan.prompt_only else request.max_tokens,
                                None if plan.prompt_only else request.logprobs, plan.engine_prompt_logprobs)
    handles = await submit_all(ctx, prompts, params, request.priority)
    echo = await echo_texts(ctx, prompts) if plan.echo else None
    response_id, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), request.n
    base = {"id": response_id, "object": "text_completion", "created": created, "model": ctx.model_name}
    prompt_deltas: dict[int, PromptDelta] = {}  # prompt index -> its tokens and logprobs (first delta)

    def choice(i: int, c: CompletionDelta, text: str, offset: int, first: bool) -> dict[str, Any]:
        """Choice ``c`` of prompt ``i``; ``first``: its first chunk, which echoes; ``offset``: where c's text starts."""
        prompt = prompt_deltas.get(i) if first else None
        legacy_prompt = prompt if plan.legacy_logprobs is not None else None
        logprobs = None
        if c.logprobs is not None or legacy_prompt is not None:  # (a prompt-only request's c.logprobs is None)
            logprobs = completion_logprobs(c.logprobs or [], offset, legacy_prompt, plan.legacy_logprobs or 0)
        body = {"index": i * n + c.index, "text": text, "logprobs": logprobs,
                "finish_reason": _finish_reason(c.finish_reason), "stop_reason": None}
        if plan.vllm_logprobs is not None and prompt is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(prompt.raw, plan.vllm_logprobs)
        return body

    def own_text(c: CompletionDelta) -> str:
        return "" if plan.prompt_only else c.text

    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def chunks(i: int, delta: StreamDelta, first: set[tuple[int, int]], offsets: dict[tuple[int, int], int]
                   ) -> list[dict[str, Any]]:
            if delta.prompt is not None:
                prompt_deltas[i] = delta.prompt
            out = []
            for c in delta.completions:
                key = (i, c.index)
                is_first = key not in first
                head = echo[i] if echo is not None and is_first else ""
                text = head + own_text(c)
                first.add(key)
                start = offsets.get(key, 0)
                out.append({**base, "choices": [choice(i, c, text, start + len(head), is_first)]})
                offsets[key] = start + len(text)
            return out

        return sse_response(handles, chunks, base, include_usage, count_completion=not plan.prompt_only)

    texts: dict[tuple[int, int], list[str]] = {}
    finals: dict[tuple[int, int], CompletionDelta] = {}
    logprobs: dict[tuple[int, int], list[TokenLogprob]] = {}
    usage = _Usage(count_completion=not plan.prompt_only)
    for i, delta in await collect(handles, is_disconnected):
        usage.add(i, delta)
        if delta.prompt is not None:
            prompt_deltas[i] = delta.prompt
        for c in delta.completions:
            texts.setdefault((i, c.index), []).append(own_text(c))
            logprobs.setdefault((i, c.index), []).extend(c.logprobs or [])
            finals[(i, c.index)] = c
    choices = []
    for (i, j), last in sorted(finals.items()):
        head = echo[i] if echo is not None else ""
        merged_delta = CompletionDelta(j, "", [], logprobs[(i, j)] if last.logprobs is not None else None,
                                       last.finish_reason)
        choices.append(choice(i, merged_delta, head + "".join(texts[(i, j)]), len(head), True))
    return JSONResponse({**base, "choices": choices, "usage": usage.as_dict()})


# ----- /v1/chat/completions ----------------------------------------------------------
def render_chat(engine: LLMEngine, request: ChatCompletionRequest) -> list[int]:
    """Apply the tokenizer's chat template and tokenize (runs on the engine loop)."""
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": message_text(m)} for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=request.add_generation_prompt,
                                             tokenize=False)
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise RequestError(f"messages could not be rendered by the chat template: {exc}", "messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def create_chat_completion(ctx: ApiContext, request: ChatCompletionRequest,
                                 is_disconnected: Disconnected) -> Any:
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = to_sampling_params(request, ctx.limits, max_tokens, logprobs)
    token_ids = await ctx.engine.call(lambda engine: render_chat(engine, request))
    handles = await submit_all(ctx, [{"prompt_token_ids": token_ids}], params, request.priority)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name}

    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def chunks(i: int, delta: StreamDelta, first: set[int], offsets: Any) -> list[dict[str, Any]]:
            out = []
            for c in delta.completions:
                if c.index not in first:
                    first.add(c.index)
                    out.append({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                body: dict[str, Any] = {"content": c.text} if c.text else {}
                out.append({**base, "choices": [{
                    "index": c.index, "delta": body,
                    "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                    "finish_reason": _finish_reason(c.finish_reason)}]})
            return out

        return sse_response(handles, chunks, base, include_usage)

    texts: dict[int, list[str]] = {}
    entries: dict[int, list[TokenLogprob]] = {}
    finals: dict[int, CompletionDelta] = {}
    usage = _Usage()
    for i, delta in await collect(handles, is_disconnected):
        usage.add(i, delta)
        for c in delta.completions:
            texts.setdefault(c.index, []).append(c.text)
            entries.setdefault(c.index, []).extend(c.logprobs or [])
            finals[c.index] = c
    choices = [{"index": j, "message": {"role": "assistant", "content": "".join(texts[j])},
                "logprobs": chat_logprobs(entries[j]) if last.logprobs is not None else None,
                "finish_reason": _finish_reason(last.finish_reason)} for j, last in sorted(finals.items())]
    return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": usage.as_dict()})


# ----- server-sent events --------------------------------------------------------------
ChunkBuilder = Callable[[int, StreamDelta, set, dict], list[dict[str, Any]]]


def sse_response(handles: list[RequestHandle], chunks: ChunkBuilder, base: dict[str, Any],
                 include_usage: bool, count_completion: bool = True) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        usage = _Usage(count_completion)
        first: set = set()
        offsets: dict = {}
        try:
            async for i, delta in merged(handles):
                usage.add(i, delta)
                for chunk in chunks(i, delta, first, offsets):
                    if include_usage:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
            yield f"data: {json.dumps(error_body(f'request failed: {exc}', 'server_error', None, 500))}\n\n"
        else:
            if include_usage:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage.as_dict()})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
