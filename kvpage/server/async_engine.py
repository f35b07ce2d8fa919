"""One engine loop in a background thread, serving many asyncio request handlers.

:class:`LLMEngine` is single-threaded.  :class:`AsyncEngine` gives it one
thread of its own, the *engine loop*, which alone touches the engine: it
drains a queue of commands (add, abort, call), runs ``step()`` while work is
pending, turns each step's outputs into per-request :class:`StreamDelta`
objects and hands them to the handlers' asyncio queues.  Handlers never wait
for a step to end to submit or abort: an abort is applied at the start of the
next step, so a vanished client's pages are free within one step.

Faults stay local.  Building one request's delta (detokenizing, logprob
strings) runs under its own ``try``: if it raises, that request alone is
aborted and its handler gets the exception.  If ``step()`` itself raises, the
requests of that step are failed, the engine's pages are reclaimed, and the
loop goes on serving new requests, unless the failure is one the engine
cannot recover from (a tensor-parallel rank died or hung:
:class:`~kvpage.parallel.RankFailure`): then every request fails, the loop
stops and ``on_fatal`` tells the server to exit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from kvpage.engine import LLMEngine, PromptInput
from kvpage.outputs import PromptLogprobs, RequestOutput
from kvpage.parallel import RankFailure
from kvpage.sampling_params import SamplingParams
from kvpage.server.feed import DashboardFeed
from kvpage.server.telemetry import Telemetry

logger = logging.getLogger("kvpage.server")
T = TypeVar("T")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob, with the top alternatives, as strings for the API."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class PromptDelta:
    """A prompt's tokens with their logprobs, sent once, with the request's first delta."""

    tokens: list[str]  # every prompt token, as text
    entries: list[TokenLogprob]  # tokens[1:] with their logprobs and top alternatives (the first has none)
    raw: PromptLogprobs  # vLLM's shape, RequestOutput.prompt_logprobs


@dataclass(frozen=True)
class CompletionDelta:
    """What one sample produced since its last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


@dataclass(frozen=True)
class StreamDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int  # over all samples, so far
    prompt: PromptDelta | None = None  # with prompt_logprobs: in the request's first delta only


@dataclass
class _Stream:
    """Engine-loop side of one request: where its deltas go and how much was sent."""

    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue[StreamDelta | BaseException]
    hold_back: int  # characters withheld while a stop string could still begin there
    logprobs: int | None
    prompt_logprobs: int | None = None
    sent_prompt: bool = False
    sent_tokens: dict[int, int] = field(default_factory=dict)
    sent_chars: dict[int, int] = field(default_factory=dict)
    last_token_time: float | None = None

    def push(self, item: StreamDelta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)


class EngineDeadError(RuntimeError):
    pass


class RequestHandle:
    """A submitted request: iterate it for its deltas; leaving early aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream

    async def deltas(self) -> AsyncIterator[StreamDelta]:
        finished = False
        try:
            while not finished:
                item = await self._stream.deltas.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.engine.abort(self.request_id)


class AsyncEngine:
    """Thread-safe, asyncio-facing front of one :class:`LLMEngine`."""

    def __init__(self, engine: LLMEngine, telemetry: Telemetry | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.on_fatal = on_fatal
        self.fatal: BaseException | None = None  # what stopped the loop for good, if anything did
        self.telemetry = telemetry or Telemetry()
        self.feed = DashboardFeed()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvpage-engine-loop", daemon=True)
        self._thread.start()

    # ----- handler side (event loop thread) -------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine loop between steps and return its result."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        future: Future[T] = Future()

        def command() -> None:
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # handed to the caller, not raised here
                future.set_exception(exc)

        self._commands.put(command)
        return await asyncio.wrap_future(future)

    async def submit(self, prompt: PromptInput, params: SamplingParams, *, priority: int = 0) -> RequestHandle:
        """Queue a request; invalid ones raise ValueError here, before any output."""
        if (params.logprobs is not None or params.prompt_logprobs is not None) and self.engine.tokenizer is None:
            raise ValueError("logprobs need a tokenizer to name the tokens, and this model has none")
        request_id = f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         hold_back=max((len(s) for s in params.stop_strings), default=1) - 1,
                         logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs)

        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt, params, priority=priority)
            self._streams[request_id] = stream

        try:
            await self.call(add)
        except asyncio.CancelledError:  # the client left while the add was queued: undo it
            self.abort(request_id)
            raise
        return RequestHandle(self, request_id, stream)

    def abort(self, request_id: str) -> None:
        """Abort at the start of the next step (no-op for a finished or unknown id)."""
        self._commands.put(lambda: self._abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (unfinished requests are aborted and their handlers told so), then the engine's ranks."""
        self._stopping.set()
        self._commands.put(lambda: None)  # wake the loop if it is idle
        self._thread.join(timeout)
        self.engine.shutdown()

    # ----- engine loop thread ----------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            self._drain_commands(block=not engine.has_unfinished_requests())
            if self._stopping.is_set() or not engine.has_unfinished_requests():
                self.feed.after_step(engine)  # idle: watchers still see aborts and the cache settle
                continue
            try:
                outputs = engine.step()
            except RankFailure as exc:
                logger.error("engine failed for good, stopping: %s", exc)
                self.fatal = exc
                self._stopping.set()
                self._fail_all(EngineDeadError(f"the engine failed: {exc}"))
                if self.on_fatal is not None:
                    self.on_fatal(exc)
                return
            except Exception as exc:  # noqa: BLE001 - the loop must survive any step failure
                logger.error("engine step failed; failing its requests:\n%s", traceback.format_exc())
                self._fail_all(exc)
                continue
            self.telemetry.on_step(engine)
            self.feed.after_step(engine)
            now = time.monotonic()
            for output in outputs:
                self._deliver(output, now)
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self._abort(request_id)
            stream.push(exc)
        # A step that raised may have left pages half-assigned; every request is gone, so reclaim all.
        for request_id in list(self.engine.scheduler.requests):
            self.engine.abort_request(request_id)

    def _deliver(self, output: RequestOutput, now: float) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        try:
            delta = self._delta(output, stream)
        except Exception as exc:  # noqa: BLE001 - one request's fault fails that request alone
            logger.error("request %s failed:\n%s", output.request_id, traceback.format_exc())
            self._abort(output.request_id)
            stream.push(exc)
            return
        self.telemetry.on_tokens(output, stream, now)
        if delta.finished:
            self._streams.pop(output.request_id, None)
            self.telemetry.on_finish(output)
        if delta.completions or delta.finished:
            stream.push(delta)

    def _delta(self, output: RequestOutput, stream: _Stream) -> StreamDelta:
        completions = []
        num_generated = 0
        for completion in output.outputs:
            i = completion.index
            token_ids = completion.token_ids
            num_generated += len(token_ids)
            sent = stream.sent_tokens.get(i, 0)
            text = completion.text
            finished = completion.finish_reason is not None
            # Streamed text cannot be taken back: hold back what a stop string might still claim.
            end = len(text) if finished else max(len(text) - stream.hold_back, stream.sent_chars.get(i, 0))
            new_text = text[stream.sent_chars.get(i, 0):end]
            if sent == len(token_ids) and not new_text and not finished:
                continue
            logprobs = None
            if stream.logprobs is not None and completion.logprobs is not None:
                logprobs = [self._token_logprob(t, entry, stream.logprobs)
                            for t, entry in zip(token_ids[sent:], completion.logprobs[sent:])]
            stream.sent_tokens[i] = len(token_ids)
            stream.sent_chars[i] = end
            completions.append(CompletionDelta(i, new_text, token_ids[sent:], logprobs, completion.finish_reason))
        prompt = None
        if stream.prompt_logprobs is not None and output.prompt_logprobs is not None and not stream.sent_prompt:
            prompt = self._prompt_delta(output.prompt_token_ids, output.prompt_logprobs, stream.prompt_logprobs)
            stream.sent_prompt = True
        return StreamDelta(output.request_id, completions, output.finished, len(output.prompt_token_ids),
                           output.num_cached_tokens, num_generated, prompt)

    def _prompt_delta(self, token_ids: list[int], raw: PromptLogprobs, k: int) -> PromptDelta:
        tokenizer = self.engine.tokenizer
        assert tokenizer is not None, "submit refuses prompt logprobs without a tokenizer"
        entries = [self._token_logprob(t, entry, k) for t, entry in zip(token_ids[1:], raw[1:]) if entry is not None]
        return PromptDelta([tokenizer.decode([token_ids[0]])] + [e.token for e in entries], entries, raw)

    def _token_logprob(self, token_id: int, entry: Mapping[int, float], k: int) -> TokenLogprob:
        tokenizer = self.engine.tokenizer
        assert tokenizer is not None, "submit refuses logprobs without a tokenizer"
        decode = tokenizer.decode
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        return TokenLogprob(decode([token_id]), entry[token_id], [(decode([t]), lp) for t, lp in top])

    async def snapshot(self) -> dict[str, float | int]:
        """The engine's current ``get_metrics()``, read on the engine loop between steps."""
        return await self.call(lambda engine: engine.get_metrics())
