"""A persistent tensor of page tables, updated by difference each step.

Building a ``[num_seqs, max_pages]`` tensor from Python lists every step costs
O(sequences × pages), which at long contexts dominates the step's input
preparation. A page table only ever changes at its end, though: pages are
appended, and copy-on-write replaces the page being written into, which is
always the last one a sequence holds. So each sequence keeps a row here, and
a step rewrites only the entries from its last known page onward, then
gathers the rows of the scheduled sequences: O(sequences) per step.

Rows are assigned on a sequence's first step and released when it finishes
or is preempted (a preempted sequence gets a fresh table when it returns).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvpage.ops.transfer import to_device


class PageTableBuffer:
    """Rows of page ids, one per live sequence, on the model's device."""

    def __init__(self, max_rows: int, initial_width: int, device: torch.device) -> None:
        self.device = device
        self.table = torch.zeros(max_rows, max(1, initial_width), dtype=torch.int32, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._row_of: dict[int, int] = {}
        self._known: dict[int, int] = {}  # seq_id -> number of entries written to its row

    def release(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            row = self._row_of.pop(seq_id, None)
            if row is not None:
                self._free_rows.append(row)
                del self._known[seq_id]

    def _grow(self, rows: int, width: int) -> None:
        old_rows, old_width = self.table.shape
        bigger = torch.zeros(max(rows, old_rows), max(width, old_width), dtype=torch.int32, device=self.device)
        bigger[:old_rows, :old_width] = self.table
        self._free_rows.extend(range(max(rows, old_rows) - 1, old_rows - 1, -1))
        self.table = bigger

    def gather(self, seq_ids: list[int], page_lists: list[list[int]]) -> torch.Tensor:
        """``[len(seq_ids), max pages]`` page tables of these sequences (zero-padded)."""
        width = max(len(pages) for pages in page_lists)
        new_rows = sum(1 for s in seq_ids if s not in self._row_of)
        if width > self.table.shape[1] or new_rows > len(self._free_rows):
            self._grow(len(self._row_of) + new_rows, 2 * width)
        stride = self.table.shape[1]
        rows: list[int] = []
        write_at: list[int] = []  # flat offsets into the table
        write_vals: list[int] = []
        for seq_id, pages in zip(seq_ids, page_lists):
            row = self._row_of.get(seq_id)
            if row is None:
                row = self._free_rows.pop()
                self._row_of[seq_id] = row
                self.table[row].zero_()  # padding past the new owner's pages reads as page 0
                known = 0
            else:
                # The last known entry may have been replaced by a copy-on-write page.
                known = self._known[seq_id] - 1
            base = row * stride
            write_at.extend(range(base + known, base + len(pages)))
            write_vals.extend(pages[known:])
            self._known[seq_id] = len(pages)
            rows.append(row)
        # One asynchronous copy: the rows to read, then the entries to write and their values.
        packed = to_device(rows + write_at + write_vals, torch.long, self.device)
        num_rows, num_writes = len(rows), len(write_at)
        if num_writes:
            offsets = packed[num_rows: num_rows + num_writes]
            self.table.view(-1).index_copy_(0, offsets, packed[num_rows + num_writes:].to(torch.int32))
        return self.table.index_select(0, packed[:num_rows])[:, :width]
