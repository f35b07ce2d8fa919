"""The offline API: ``LLM(...).generate(prompts, params)``, as in vLLM.

It queues every prompt on an :class:`~kvpage.engine.LLMEngine` and steps the
engine until all are done, so the prompts are served together by continuous
batching, not one by one.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from kvpage.engine import LLMEngine, PromptInput
from kvpage.outputs import RequestOutput
from kvpage.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """A model plus a paged KV cache, for batch generation in-process.

    Keyword arguments are the engine options of :class:`~kvpage.config.EngineConfig`
    (``block_size``, ``num_kv_blocks``, ``kv_cache_memory``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``enable_prefix_caching``,
    ``dtype``, ``device``, ``seed``, ...). ``model=None`` loads the built-in demo
    model (``kvpage/assets/demo-model``, trained on the King James Bible).
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine.from_kwargs(model=model, **engine_options)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | SequenceABC[PromptInput],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: SequenceABC[int] | None = None) -> list[RequestOutput]:
        """Generate completions for every prompt; returns one output per prompt, in order.

        ``prompts`` is a string, a ``{"prompt_token_ids": [...]}`` dict, or a
        list of either. ``sampling_params`` is one ``SamplingParams`` for all
        prompts or a list with one per prompt.
        """
        given = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if not given:
            return []
        prompt_list: list[str | dict[str, Any]] = []
        for p in given:
            if not isinstance(p, (str, dict)):
                raise ValueError(f"each prompt must be a string or a dict such as {{'prompt_token_ids': [...]}}, "
                                 f"got {type(p).__name__}; wrap token ids as {{'prompt_token_ids': ids}}")
            prompt_list.append(p)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"sampling_params has {len(params_list)} entries but there are "
                                 f"{len(prompt_list)} prompts; pass one SamplingParams or one per prompt")
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(priorities) != len(prompt_list):
            raise ValueError(f"priority has {len(priorities)} entries but there are {len(prompt_list)} prompts")

        engine = self.engine
        ids: list[str] = []
        # Only final outputs are needed here: skip building per-step snapshots.
        final_only = {id(p): replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list}
        try:
            for prompt, params, prio in zip(prompt_list, params_list, priorities):
                ids.append(engine.add_request(None, prompt, final_only[id(params)], priority=prio))
        except ValueError:
            for request_id in ids:  # all or nothing: leave no half-submitted batch behind
                engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        pending = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while pending:
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        pending.discard(output.request_id)
                        finished[output.request_id] = output
                        bar.update(1)
            engine.drain()  # a step launched ahead for requests that have just finished
        except BaseException:
            for request_id in pending:
                engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]

    def shutdown(self) -> None:
        """Stop the engine's follower processes (tensor parallelism); also done at interpreter exit."""
        self.engine.shutdown()

    def get_metrics(self) -> dict[str, float | int]:
        """Engine counters: preemptions, prefix-cache queries and hits, KV pages, step timings, ..."""
        return self.engine.get_metrics()
