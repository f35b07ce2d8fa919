"""From a step's sampled tokens to what callers see: stop strings, text, ``RequestOutput``s.

The scheduler stops sequences on tokens (EOS, stop token ids, lengths); stop
*strings* need text, so they are checked here on each sequence's
incrementally detokenized output, and a match ends the sequence through the
sequence's lifecycle. Then every request that got a token is reported, unless it asked
for its final output only; text is decoded lazily, on first access, until
the request finishes.  A request's prompt logprobs are all in by its first
token (the step that samples it scores the prompt's last positions); they
are shaped once, into vLLM's list of ``{token id: Logprob}``, and that list
is reported with each of its outputs.
"""

from __future__ import annotations

import time
from typing import Any

from kvpage.detokenizer import IncrementalDetokenizer, find_stop_string
from kvpage.metrics import RequestCounters
from kvpage.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from kvpage.sampling_params import RequestOutputKind
from kvpage.sched.lifecycle import Lifecycle
from kvpage.sched.prompt_logprobs import is_scored
from kvpage.sched.sequence import Request, Sequence, SequenceStatus

__all__ = ["OutputBuilder"]


class OutputBuilder:
    """Detokenizers of the live sequences, stop strings, and the outputs of each step."""

    def __init__(self, tokenizer: Any | None, life: Lifecycle, request_counters: RequestCounters) -> None:
        self.tokenizer = tokenizer
        self.life = life
        self.request_counters = request_counters
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._prompt_logprobs: dict[str, PromptLogprobs] = {}  # request_id -> its prompt logprobs, shaped

    def forget(self, request: Request) -> None:
        """Drop the detokenizers and prompt logprobs of a request that ended (finished or aborted)."""
        for seq in request.sequences:
            self._detokenizers.pop(seq.seq_id, None)
        self._prompt_logprobs.pop(request.request_id, None)

    def prompt_logprobs(self, request: Request) -> PromptLogprobs | None:
        """vLLM's ``prompt_logprobs`` of a request that asked for them: entry 0 None, then per prompt token
        ``{token id: Logprob}`` of the token and the top-k, the token first (shaped once per request)."""
        if request.sampling_params.prompt_logprobs is None:
            return None
        shaped = self._prompt_logprobs.get(request.request_id)
        if shaped is not None:
            return shaped
        scores = request.prompt_scores
        if not is_scored(request):
            raise RuntimeError(f"request {request.request_id!r} is reported before its prompt logprobs arrived")
        prompt = request.prompt_token_ids
        shaped = [None]
        if scores is not None:
            names = self._token_names({t for ids in scores.top_ids for t in ids} | set(prompt[1:]))
            for i, position in enumerate(scores.positions):
                token = prompt[position + 1]
                entry = {token: Logprob(scores.token_logprobs[i], scores.ranks[i], names.get(token))}
                for rank, (tid, value) in enumerate(zip(scores.top_ids[i], scores.top_logprobs[i]), start=1):
                    entry.setdefault(tid, Logprob(value, rank, names.get(tid)))
                shaped.append(entry)
        self._prompt_logprobs[request.request_id] = shaped
        return shaped

    def _token_names(self, token_ids: set[int]) -> dict[int, str]:
        """Each token decoded alone (what ``Logprob.decoded_token`` holds); empty without a tokenizer."""
        if self.tokenizer is None:
            return {}
        ids = sorted(token_ids)
        return dict(zip(ids, self.tokenizer.batch_decode([[t] for t in ids])))

    def _detokenizer(self, seq: Sequence) -> IncrementalDetokenizer:
        detok = self._detokenizers.get(seq.seq_id)
        if detok is None:
            # Only text-producing paths get here, and those need a tokenizer: add_request
            # rejects stop strings without one, and _text_of returns "" when there is none.
            assert self.tokenizer is not None, "a detokenizer needs a tokenizer"
            detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids, seq.num_prompt_tokens,
                                           seq.request.sampling_params.skip_special_tokens)
            self._detokenizers[seq.seq_id] = detok
        return detok

    def check_stop_strings(self, touched: list[Sequence]) -> None:
        """End the sequences whose new text completes one of their stop strings."""
        for seq in touched:
            stops = seq.request.sampling_params.stop_strings
            if not stops or seq.status is SequenceStatus.FINISHED_ABORTED:
                continue
            detok = self._detokenizer(seq)
            new_text = detok.update()
            if seq.is_finished:
                new_text += detok.flush()
            match = find_stop_string(detok.text, len(new_text), stops) if new_text else None
            if match is None:
                continue
            index, stop = match
            keep = index + len(stop) if seq.request.sampling_params.include_stop_str_in_output else index
            detok.freeze(detok.text[:keep])
            self.life.stop_by_string(seq, stop)  # also if EOS or length ended it this very step

    def _text_of(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        detok = self._detokenizer(seq)
        detok.update()
        if seq.is_finished:
            detok.flush()
        return detok.text

    def collect(self, touched: list[Sequence]) -> list[RequestOutput]:
        """Outputs of the requests whose sequences got a token (final ones only, where asked)."""
        requests: dict[str, Request] = {}
        for seq in touched:
            requests.setdefault(seq.request.request_id, seq.request)
        outputs = []
        now = time.monotonic()
        for request in requests.values():
            finished = request.is_finished
            times = request.times
            if times is not None:
                if times.first_token is None:
                    times.first_token = now
                if finished:
                    times.finished = now
            if finished:
                self.request_counters.num_requests_finished += 1
            elif request.sampling_params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self._request_output(request))
        return outputs

    def _request_output(self, request: Request) -> RequestOutput:
        completions = []
        finished = request.is_finished
        prompt_logprobs = self.prompt_logprobs(request)  # before forget(): a finished request's are dropped
        if request.beam is not None:  # the best finished hypotheses, not the sequences that carried them
            skip = request.sampling_params.skip_special_tokens
            completions = [CompletionOutput(
                index=i, token_ids=list(h.token_ids), finish_reason=h.finish_reason, stop_reason=None, logprobs=None,
                text=self.tokenizer.decode(list(h.token_ids), skip_special_tokens=skip) if self.tokenizer else "")
                for i, h in enumerate(request.beam.results())]
        for seq in request.sequences if request.beam is None else ():
            decode = (lambda s=seq: self._text_of(s))
            text: str | Any = self._text_of(seq) if finished else decode
            completions.append(CompletionOutput(
                index=seq.sample_index, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.output_logprobs) if seq.output_logprobs is not None else None, text=text))
        if finished:
            self.forget(request)
        times = request.times
        metrics = None
        if times is not None:
            metrics = RequestMetrics(
                arrival_time=times.arrival,
                queue_time=None if times.scheduled is None else times.scheduled - times.arrival,
                time_to_first_token=None if times.first_token is None else times.first_token - times.arrival,
                e2e_latency=None if times.finished is None else times.finished - times.arrival)
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=completions, finished=finished,
                             num_cached_tokens=request.sequences[0].num_cached_prompt_tokens,
                             prompt_logprobs=prompt_logprobs, metrics=metrics)
