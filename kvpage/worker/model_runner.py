"""The model runner: one scheduled step in, one sampled token per finished row out.

It owns the model, the per-layer KV tensors and the sampler. For each step it

1. performs the copy-on-write page copies the scheduler asked for;
2. flattens the scheduled sequences into one token batch: input ids,
   positions, the *slot mapping* (the flat cache slot each new token's K/V is
   written to: ``page_id * block_size + offset``) and the padded block tables
   through which attention reads the context;
3. runs the model, takes the hidden state at the last position of every
   sequence that samples this step, and samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpage.batch import PageOps, SampledToken, ScheduledSequence, SchedulerOutput
from kvpage.model import CausalLM
from kvpage.ops import AttentionMetadata, copy_pages
from kvpage.worker.block_table_buffer import BlockTableBuffer
from kvpage.worker.sampler import Sampler


@dataclass(frozen=True)
class KVCacheShape:
    """Geometry of the paged KV cache of one model."""

    num_layers: int
    num_pages: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        return page_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)


def page_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers, K and V together."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def allocate_kv_cache(shape: KVCacheShape, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K and V tensors of ``[num_pages, block_size, num_kv_heads, head_dim]``."""
    dims = (shape.num_pages, shape.block_size, shape.num_kv_heads, shape.head_dim)
    return [(torch.zeros(dims, dtype=shape.dtype, device=device), torch.zeros(dims, dtype=shape.dtype, device=device))
            for _ in range(shape.num_layers)]


@dataclass
class StepInputs:
    """The flattened tensors of one step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    # Row of each sampling sequence's last token in the flattened batch.
    sample_rows: torch.Tensor
    sample_seqs: list[ScheduledSequence]


class ModelRunner:
    """Executes scheduled steps on one device."""

    def __init__(self, model: CausalLM, cache_shape: KVCacheShape, device: torch.device, seed: int,
                 eos_token_ids: tuple[int, ...], max_num_seqs: int, max_pages_per_seq: int,
                 num_host_pages: int = 0) -> None:
        self.model = model
        self.device = device
        self.cache_shape = cache_shape
        self.block_size = cache_shape.block_size
        self.kv_caches = allocate_kv_cache(cache_shape, device)
        # Swap space in host memory, pinned so that copies to and from a GPU run at full speed.
        host = (num_host_pages, cache_shape.block_size, cache_shape.num_kv_heads, cache_shape.head_dim)
        pin = device.type == "cuda"
        self.host_caches = [(torch.empty(host, dtype=cache_shape.dtype, pin_memory=pin),
                             torch.empty(host, dtype=cache_shape.dtype, pin_memory=pin))
                            for _ in range(cache_shape.num_layers)] if num_host_pages else []
        self.sampler = Sampler(device, seed, eos_token_ids)
        self.block_tables = BlockTableBuffer(max_num_seqs, max_pages_per_seq, device)

    def prepare_inputs(self, seqs: list[ScheduledSequence]) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[ScheduledSequence] = []
        for seq in seqs:
            start = seq.start_position
            num = len(seq.input_token_ids)
            input_ids.extend(seq.input_token_ids)
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
        dev = self.device
        metadata = AttentionMetadata(
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=self.block_tables.gather([s.seq_id for s in seqs], [s.page_ids for s in seqs]),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_size=bs,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            metadata=metadata,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            sample_seqs=sample_seqs,
        )

    def prepare(self, out: SchedulerOutput) -> StepInputs | None:
        """Drop state of ended sequences and build the step's tensors (None if nothing runs)."""
        # Preempted sequences keep their generators: their random stream resumes after recompute.
        self.sampler.forget(out.finished_seq_ids)
        self.block_tables.release(out.finished_seq_ids)
        self.block_tables.release(out.preempted_seq_ids)
        return self.prepare_inputs(out.sequences) if out.sequences else None

    @torch.inference_mode()
    def apply_page_ops(self, page_ops: list[PageOps]) -> None:
        """Perform a step's swaps and page copies, in order (later ones may reuse pages earlier ones freed)."""
        for ops in page_ops:
            if ops.kind == "copy":
                copy_pages(self.kv_caches, ops.pairs)
            elif ops.kind == "swap_out":
                self._swap_out(ops.pairs)
            else:
                self._swap_in(ops.pairs)

    def _swap_out(self, pairs: list[tuple[int, int]]) -> None:
        device_ids = torch.tensor([d for d, _ in pairs], dtype=torch.long, device=self.device)
        host_ids = torch.tensor([h for _, h in pairs], dtype=torch.long)
        for (key, value), (host_key, host_value) in zip(self.kv_caches, self.host_caches):
            # Blocking: the freed device pages may be overwritten by this very step.
            host_key[host_ids] = key.index_select(0, device_ids).cpu()
            host_value[host_ids] = value.index_select(0, device_ids).cpu()

    def _swap_in(self, pairs: list[tuple[int, int]]) -> None:
        host_ids = torch.tensor([h for h, _ in pairs], dtype=torch.long)
        device_ids = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for (key, value), (host_key, host_value) in zip(self.kv_caches, self.host_caches):
            key.index_copy_(0, device_ids, host_key.index_select(0, host_ids).to(self.device))
            value.index_copy_(0, device_ids, host_value.index_select(0, host_ids).to(self.device))

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> list[SampledToken]:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        if not inputs.sample_seqs:
            return []
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        return self.sampler(logits, inputs.sample_seqs)
