"""CUDA graphs for decode steps.

A decode step of a small model is hundreds of short kernel launches; on a
fast GPU launching them from Python takes longer than running them. A CUDA
graph records the launches of one forward pass once and replays them with a
single call. A graph is frozen, though: same kernels, same grid sizes, same
tensor addresses. So:

* graphs are captured for a ladder of batch sizes (1, 2, 4, 8, then every
  8 up to ``max_num_seqs``), and a step of ``B`` sequences replays the
  smallest graph of at least ``B`` rows; the spare rows are padding, with
  cache slot -1 (nothing is written) and sequence length 0 (nothing is read);
* every input lives in a static buffer that a step overwrites in place:
  token ids, positions, slot mapping, page tables and sequence lengths;
* the attention kernels choose their split-KV factor from the batch size
  alone (see :mod:`kvpage.ops.triton_attention`), so one graph serves
  every mix of sequence lengths.

Only decode-only steps (one new token per sequence) with the Triton
attention backend replay graphs; anything else runs eagerly. The model
returns hidden states; sampling happens after the replay, outside the graph.
"""

from __future__ import annotations

import torch

from kvpage.model import CausalLM
from kvpage.ops import AttentionMetadata, LayerKV
from kvpage.ops.metadata import KernelWork

__all__ = ["DecodeGraphs", "capture_sizes"]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: every batch of up to ``max_num_seqs`` pads to one of them."""
    sizes = [size for size in (1, 2, 4) if size < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return sorted(set(sizes) | {max_num_seqs})


class DecodeGraphs:
    """One captured forward pass per batch size, over shared static input buffers."""

    def __init__(self, model: CausalLM, kv_layers: list[LayerKV], max_num_seqs: int,
                 max_pages_per_seq: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_layers = kv_layers
        self.block_size = block_size
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        rows = self.sizes[-1]
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.page_tables = torch.zeros(rows, max_pages_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        # Row i is sequence i and decodes: these never change.
        self.query_start = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.decode_seqs = torch.arange(rows, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(rows, model.config.hidden_size, dtype=model.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Staging for one step's inputs: ids, positions, slots, lengths, then the rows whose input is in
        # flight and their rows in the previous step's tokens. Two buffers, used in turn: the copy out of
        # one may still be queued behind the running step while the next step is staged.
        self._staging = [torch.zeros(6 * rows, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._turn = 0

    def _metadata(self, size: int) -> AttentionMetadata:
        meta = AttentionMetadata(query_lens=[1] * size, seq_lens=[1] * size, page_tables=self.page_tables[:size],
                                 slot_mapping=self.slot_mapping[:size], block_size=self.block_size,
                                 backend="triton")
        meta.use_kernel_work(KernelWork(self.query_start[: size + 1], self.seq_lens[:size], self.decode_seqs[:size],
                                        torch.zeros(0, 2, dtype=torch.int32, device=self.device)))
        return meta

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, all in one memory pool (they never run at once)."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = self._metadata(size)
            # Compile the Triton kernels and let the allocator settle before recording.
            self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], self.kv_layers, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], self.kv_layers, meta)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def padded_size(self, num_seqs: int) -> int | None:
        """The graph a batch of ``num_seqs`` decoding sequences replays (None: too big, run eagerly)."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            page_tables: torch.Tensor, inflight_rows: list[int], inflight_sources: list[int],
            previous_tokens: torch.Tensor | None) -> torch.Tensor:
        """Replay the graph for this batch; returns hidden states ``[B, hidden]`` (a view, valid until the next run).

        Row ``inflight_rows[i]`` takes its input id from ``previous_tokens[inflight_sources[i]]``, on the device.
        """
        batch = len(input_ids)
        size = self.padded_size(batch)
        assert size is not None
        pad = size - batch
        num_inflight = len(inflight_rows)
        values = (input_ids + [0] * pad + positions + [0] * pad + slots + [-1] * pad + seq_lens + [0] * pad
                  + inflight_rows + inflight_sources)
        # Safe to overwrite: the engine has waited for the tokens of the step that used this buffer last.
        staged = self._staging[self._turn][: len(values)]
        self._turn ^= 1
        staged.copy_(torch.tensor(values, dtype=torch.long))
        on_device = staged.to(self.device, non_blocking=True)
        lanes = on_device[: 4 * size].view(4, size)
        self.input_ids[:size] = lanes[0]
        self.positions[:size] = lanes[1]
        self.slot_mapping[:size] = lanes[2]
        self.seq_lens[:size] = lanes[3]
        if num_inflight:
            assert previous_tokens is not None
            rows, sources = on_device[4 * size: 4 * size + num_inflight], on_device[4 * size + num_inflight:]
            self.input_ids.index_copy_(0, rows, previous_tokens.index_select(0, sources))
        self.page_tables[:batch, : page_tables.shape[1]] = page_tables
        self.graphs[size].replay()
        return self.hidden[:batch]
