"""Prompt logprobs on the device: the LM head over a step's scored prompt positions.

The runner projects to logits only the rows it samples, except for the
prompt positions a step scores (``ScheduledSequence.prompt_logprob_positions``,
chosen by :mod:`kvpage.sched.prompt_logprobs`): for those rows alone it
computes the logits, ``log_softmax`` in float32, and gathers the logprob and
rank of the prompt token that follows each position and the top-k
alternatives.  Other sequences pay nothing.

The rows are projected in slices of bounded size, so a long prefill chunk
never materializes a ``[chunk, vocab]`` float32 block at once.  Like the
sampler's results, everything stays on the device until the small results
are copied to the host asynchronously (pinned memory, an event on a GPU);
:meth:`PendingPromptLogprobs.result` waits for that copy only, so
asynchronous scheduling keeps planning the next step meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpage.model import CausalLM
from kvpage.ops.transfer import to_device_segments
from kvpage.step_io import PromptLogprobs, ScheduledSequence

# Float32 logits elements computed at once (rows x vocab): 16 Mi elements, 64 MiB a tensor. The memory
# profile does not reserve for them; a slice's few such tensors fit in what gpu_memory_utilization leaves.
MAX_LOGITS_ELEMENTS = 1 << 24


@dataclass
class ScoredRows:
    """A step's scored prompt positions, flattened: their rows in the batch and the tokens they score."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    seqs: list[ScheduledSequence] = field(default_factory=list)  # with positions, in row order

    def add(self, seq: ScheduledSequence, first_row: int) -> None:
        """Add ``seq``'s scored positions; ``first_row`` is the batch row of its first input token."""
        positions = seq.prompt_logprob_positions
        offset = first_row - seq.start_position
        self.rows.extend(range(positions.start + offset, positions.stop + offset))
        self.targets.extend(seq.all_token_ids[positions.start + 1: positions.stop + 1])
        self.seqs.append(seq)


@torch.inference_mode()
def score_prompt_rows(model: CausalLM, hidden: torch.Tensor, scored: ScoredRows) -> PendingPromptLogprobs:
    """Enqueue the scoring of ``scored``'s rows of ``hidden`` (the final hidden states of the batch)."""
    device = hidden.device
    rows, targets = to_device_segments([scored.rows, scored.targets], torch.long, device)
    k = max(seq.sampling_params.prompt_logprobs or 0 for seq in scored.seqs)
    rows_per_slice = max(1, MAX_LOGITS_ELEMENTS // model.lm_head.shape[0])
    parts: list[tuple[torch.Tensor, ...]] = []
    for begin in range(0, len(scored.rows), rows_per_slice):
        end = begin + rows_per_slice
        logprobs = torch.log_softmax(model.compute_logits(hidden.index_select(0, rows[begin:end]), float32=True),
                                     dim=-1)
        chosen = logprobs.gather(1, targets[begin:end].unsqueeze(1))
        # Rank 1 is the most likely token: 1 + the number of tokens strictly more likely.
        ranks = (logprobs > chosen).sum(dim=1) + 1
        if k:
            top_values, top_ids = logprobs.topk(k, dim=-1)
            parts.append((chosen.squeeze(1), ranks, top_values, top_ids))
        else:
            parts.append((chosen.squeeze(1), ranks))
    device_results = [torch.cat(columns) if len(parts) > 1 else columns[0] for columns in zip(*parts)]
    return PendingPromptLogprobs(device_results, scored.seqs)


class PendingPromptLogprobs:
    """One step's prompt-position scores on their way to the host."""

    def __init__(self, device_results: list[torch.Tensor], seqs: list[ScheduledSequence]) -> None:
        self.seqs = seqs
        on_gpu = device_results[0].is_cuda
        self._host = [t.to("cpu", non_blocking=on_gpu) for t in device_results]
        self._event: torch.cuda.Event | None = None
        if on_gpu:
            self._event = torch.cuda.Event()
            self._event.record()
        self._delivered = False

    def deliver(self) -> None:
        """Wait for the copy and write each sequence's :class:`PromptLogprobs` into its scheduled record."""
        if self._delivered:
            return
        if self._event is not None:
            self._event.synchronize()
        columns = [t.tolist() for t in self._host]
        chosen, ranks = columns[0], columns[1]
        top_values, top_ids = (columns[2], columns[3]) if len(columns) > 2 else (None, None)
        row = 0
        for seq in self.seqs:
            positions = seq.prompt_logprob_positions
            end = row + len(positions)
            k = seq.sampling_params.prompt_logprobs or 0
            ids = [r[:k] for r in top_ids[row:end]] if top_ids is not None else [[] for _ in positions]
            values = [r[:k] for r in top_values[row:end]] if top_values is not None else [[] for _ in positions]
            seq.prompt_logprobs = PromptLogprobs(positions, chosen[row:end], ranks[row:end], ids, values)
            row = end
        self._delivered = True
