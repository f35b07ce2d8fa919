"""The CPU swap space: pages of host memory that hold preempted sequences' K/V.

Swapping a preempted sequence out copies its computed pages to the swap
space and frees its device pages; swapping it back in takes fresh device
pages and copies them back, so it resumes exactly where it stopped instead
of recomputing its whole context. The swap space only hands out page ids;
the runner owns the host tensors and performs the copies the manager
returns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SwappedTable:
    """What a swapped-out sequence keeps: its host pages and its place in the prefix-hash chain."""

    host_page_ids: list[int]
    hashes: list[bytes]
    num_computed_tokens: int


class SwapSpace:
    """A free list of host page ids."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"the swap space must have >= 0 pages, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int] | None:
        """``count`` host pages, or None (and nothing taken) if there are fewer free."""
        if count > len(self._free):
            return None
        taken = self._free[len(self._free) - count:]
        del self._free[len(self._free) - count:]
        return taken

    def give_back(self, page_ids: list[int]) -> None:
        self._free.extend(page_ids)
