"""The model runner: one scheduled step in, one sampled token per finished row out.

It owns the model, the KV cache tensors and the sampler. Under tensor
parallelism every rank has one, over its shard; all of them run every step
and the driver's alone samples. For each step it

1. performs the step's page operations (swaps, copy-on-write copies), in order;
2. flattens the scheduled sequences into one token batch: input ids,
   positions, the *slot mapping* (the flat cache slot each new token's K/V is
   written to: ``page_id * block_size + offset``) and the page tables
   through which attention reads the context. On a GPU these go to the
   device in one pinned, asynchronous copy;
3. runs the model (a decode-only step replays a CUDA graph when one was
   captured), takes the hidden state at the last position of every sequence
   that samples this step, and samples; the prompt positions a step scores
   for prompt logprobs get their logits too (:mod:`kvpage.worker.prompt_logprobs`).

:meth:`ModelRunner.launch` only *enqueues* that work and returns a
:class:`LaunchedStep`; its sampled tokens are read with
:meth:`LaunchedStep.result`. In between the host is free: the engine plans
and launches the next step meanwhile (asynchronous scheduling). A sequence
of that next step may then have as its input the token the running step is
still sampling (``INFLIGHT_TOKEN``); the runner copies it from the running
step's output tensor on the device, so the host never waits for it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property

import torch

from kvpage.ops import LayerKV

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # pragma: no cover
    from typing_extensions import assert_never

from kvpage.model import CausalLM
from kvpage.ops import AttentionMetadata
from kvpage.ops.metadata import resolve_backend
from kvpage.ops.transfer import to_device, to_device_segments
from kvpage.step_io import INFLIGHT_TOKEN, PageOpKind, PageOps, SampledToken, ScheduledSequence, SchedulerOutput
from kvpage.worker.cuda_graphs import DecodeGraphs
from kvpage.worker.kv_cache import KVCache, KVCacheShape
from kvpage.worker.page_table_buffer import PageTableBuffer
from kvpage.worker.prompt_logprobs import PendingPromptLogprobs, ScoredRows, score_prompt_rows
from kvpage.worker.sampler import PendingSamples, Sampler


@dataclass(frozen=True)
class RunnerOptions:
    """How the runner executes: which attention code, and whether decode replays CUDA graphs."""

    attention_backend: str = "auto"
    enforce_eager: bool = False

    def captures_graphs(self, device: torch.device) -> bool:
        """Decode replays CUDA graphs on a GPU with the Triton kernels, unless told to stay eager."""
        return device.type == "cuda" and resolve_backend(self.attention_backend, device) == "triton" \
            and not self.enforce_eager


@dataclass
class StepInputs:
    """One step's flattened batch, as host lists; the device tensors are made by the path that runs it."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    page_tables: torch.Tensor
    # Row of each sampling sequence's last token in the flattened batch.
    sample_rows: list[int]
    sample_seqs: list[ScheduledSequence]
    # Rows whose input is the token the previous step is still sampling, and their sequences.
    inflight_rows: list[int] = field(default_factory=list)
    inflight_seq_ids: list[int] = field(default_factory=list)
    # Prompt positions scored for prompt logprobs (None: none this step).
    scored: ScoredRows | None = None

    @property
    def is_decode(self) -> bool:
        return len(self.input_ids) == len(self.query_lens)


@dataclass
class LaunchedStep:
    """A step whose device work is enqueued; ``result()`` waits for its sampled tokens."""

    samples: PendingSamples | None = None
    prompt_logprobs: PendingPromptLogprobs | None = None

    @cached_property
    def row_of_seq(self) -> dict[int, int]:
        """Row of each sampling sequence in ``samples.tokens``: where the next step finds its in-flight input."""
        return {seq.seq_id: row for row, seq in enumerate(self.samples.seqs)} if self.samples is not None else {}

    def result(self) -> list[SampledToken]:
        """The sampled tokens; the scored prompt positions' results go into their ``ScheduledSequence``."""
        if self.prompt_logprobs is not None:
            self.prompt_logprobs.deliver()
        return self.samples.result() if self.samples is not None else []


class ModelRunner:
    """Executes scheduled steps on one device."""

    def __init__(self, model: CausalLM, cache_shape: KVCacheShape, device: torch.device, seed: int,
                 eos_token_ids: tuple[int, ...], max_num_seqs: int, max_pages_per_seq: int,
                 num_host_pages: int = 0, options: RunnerOptions | None = None) -> None:
        self.options = options or RunnerOptions()
        self.model = model
        self.device = device
        self.cache_shape = cache_shape
        self.block_size = cache_shape.block_size
        self.kv_cache = KVCache(cache_shape, device, num_host_pages, self.options.attention_backend)
        self.sampler = Sampler(device, seed, eos_token_ids, use_kernels=self.kv_cache.use_kernels)
        self.page_tables = PageTableBuffer(max_num_seqs, max_pages_per_seq, device)
        self.graphs: DecodeGraphs | None = None
        if self.options.captures_graphs(device):
            self.graphs = DecodeGraphs(model, self.kv_cache.layers, max_num_seqs, max_pages_per_seq, self.block_size,
                                       device)
            self.graphs.capture()

    @property
    def kv_caches(self) -> list[LayerKV]:
        """Per layer, the (key cache, value cache) views ``[num_pages, block_size, num_kv_heads, head_dim]``."""
        return self.kv_cache.layers

    def prepare_inputs(self, seqs: list[ScheduledSequence]) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[ScheduledSequence] = []
        inflight_rows: list[int] = []
        inflight_seq_ids: list[int] = []
        scored: ScoredRows | None = None
        for seq in seqs:
            start = seq.start_position
            num = len(seq.input_token_ids)
            if seq.prompt_logprob_positions:
                scored = scored or ScoredRows()
                scored.add(seq, len(input_ids))
            input_ids.extend(seq.input_token_ids)
            if input_ids[-1] == INFLIGHT_TOKEN:
                inflight_rows.append(len(input_ids) - 1)
                inflight_seq_ids.append(seq.seq_id)
            pages = seq.page_ids
            if num == 1:  # decode: skip the range machinery
                positions.append(start)
                slots.append(pages[start // bs] * bs + start % bs)
            else:
                span = range(start, start + num)
                positions.extend(span)
                slots.extend(pages[p // bs] * bs + p % bs for p in span)
            query_lens.append(num)
            seq_lens.append(start + num)
            if seq.sample:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        page_tables = self.page_tables.gather([s.seq_id for s in seqs], [s.page_ids for s in seqs])
        return StepInputs(input_ids, positions, slots, query_lens, seq_lens, page_tables, sample_rows, sample_seqs,
                          inflight_rows, inflight_seq_ids, scored)

    def prepare(self, out: SchedulerOutput) -> StepInputs | None:
        """Drop state of ended sequences and build the step's inputs (None if nothing runs)."""
        # Preempted sequences keep their generators: their random stream resumes after recompute.
        self.sampler.forget(out.finished_seq_ids)
        self.page_tables.release(out.finished_seq_ids)
        self.page_tables.release(out.preempted_seq_ids)
        return self.prepare_inputs(out.sequences) if out.sequences else None

    @torch.inference_mode()
    def apply_page_ops(self, page_ops: list[PageOps]) -> None:
        """Perform a step's swaps and page copies, in order (later ones may reuse pages earlier ones freed)."""
        for ops in page_ops:
            kind = ops.kind
            if kind is PageOpKind.COPY:
                self.kv_cache.copy(ops.pairs)
            elif kind is PageOpKind.SWAP_OUT:
                self.kv_cache.swap_out(ops.pairs)
            elif kind is PageOpKind.SWAP_IN:
                self.kv_cache.swap_in(ops.pairs)
            else:
                assert_never(kind)

    def _inflight_sources(self, inputs: StepInputs,
                          previous: LaunchedStep | None) -> tuple[list[int], torch.Tensor | None]:
        """For each in-flight input, its row in the previous step's sampled tokens; and those tokens."""
        if not inputs.inflight_rows:
            return [], None
        samples = previous.samples if previous is not None else None
        rows = previous.row_of_seq if previous is not None else {}
        if samples is None or any(seq_id not in rows for seq_id in inputs.inflight_seq_ids):
            raise RuntimeError("a step's input is a token no running step samples; the engine must launch "
                               "steps with in-flight inputs right after the step that samples them")
        return [rows[seq_id] for seq_id in inputs.inflight_seq_ids], samples.tokens

    def _forward(self, inputs: StepInputs, previous: LaunchedStep | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of the batch, and the rows to sample (None: the first ``len(sample_rows)`` rows)."""
        sources, previous_tokens = self._inflight_sources(inputs, previous)
        graphs = self.graphs
        if graphs is not None and inputs.is_decode and graphs.padded_size(len(inputs.input_ids)) is not None:
            hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.slots, inputs.seq_lens,
                                inputs.page_tables, inputs.inflight_rows, sources, previous_tokens)
            # Usually every row samples; a one-token prefill chunk that ends mid-prompt does not.
            rows = None if len(inputs.sample_rows) == len(inputs.input_ids) else to_device(
                inputs.sample_rows, torch.long, self.device)
            return hidden, rows
        input_ids, positions, slots, sample_rows, fill_rows, fill_sources = to_device_segments(
            [inputs.input_ids, inputs.positions, inputs.slots, inputs.sample_rows, inputs.inflight_rows, sources],
            torch.long, self.device)
        if previous_tokens is not None:
            input_ids.index_copy_(0, fill_rows, previous_tokens.index_select(0, fill_sources))
        metadata = AttentionMetadata(query_lens=inputs.query_lens, seq_lens=inputs.seq_lens,
                                     page_tables=inputs.page_tables, slot_mapping=slots,
                                     block_size=self.block_size, backend=self.options.attention_backend)
        return self.model(input_ids, positions, self.kv_cache.layers, metadata), sample_rows

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, inputs: StepInputs | None,
               previous: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueue the step's page operations, forward pass and sampling; returns without waiting.

        ``previous`` is the step launched just before, when its tokens are still in flight.
        """
        self.apply_page_ops(out.page_ops)
        if inputs is None:
            return LaunchedStep()
        hidden, rows = self._forward(inputs, previous)
        # Enqueued now: a decode graph's hidden states are a view of its buffer, valid until its next replay.
        scored = score_prompt_rows(self.model, hidden, inputs.scored) if inputs.scored is not None else None
        if not inputs.sample_seqs:
            return LaunchedStep(prompt_logprobs=scored)
        logits = self.model.compute_logits(hidden if rows is None else hidden[rows],
                                           float32=self.sampler.needs_float32(inputs.sample_seqs))
        tp = self.model.tp
        if tp.size == 1:
            return LaunchedStep(self.sampler.sample(logits, inputs.sample_seqs), scored)
        # Tensor parallelism: the driver samples, once; the followers get its tokens for their in-flight inputs.
        if tp.is_driver:
            samples = self.sampler.sample(logits, inputs.sample_seqs)
            tp.broadcast(samples.tokens)
        else:
            tokens = torch.empty(len(inputs.sample_seqs), dtype=torch.long, device=self.device)
            samples = PendingSamples(tp.broadcast(tokens), inputs.sample_seqs)
        return LaunchedStep(samples, scored)
