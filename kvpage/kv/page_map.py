"""A picture of the page array: what every physical page holds, and whose it is (pure Python).

The live dashboard and the offline reports draw the cache page by page.
:meth:`~kvpage.kv.interface.KVManager.page_map` takes a :class:`PageMap`
between two steps, and does as little as it can there: it copies the page
tables and the LRU order, and nothing that scales with the free pages.  The
per-page picture, one character a page, is worked out from the copy later
(:meth:`PageMap.states`), off the step loop:

====  ==========================================================================
char  the page is
====  ==========================================================================
``.`` free
``x`` free, but in a hole too small for the next waiting request's reservation
      (external fragmentation: contiguous layouts only)
``c`` cached-free: unused, still holding a prefix-cache page; evictable
``u`` in use by one sequence
``s`` shared: in the page tables of several sequences (reference count > 1)
``r`` reserved: inside a contiguous reservation, past the tokens written so far
====  ==========================================================================

A page's reference count is the number of page tables that list it (a table
never lists a page twice), so the tables alone say which pages are shared.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import chain

FREE, FRAGMENT, CACHED, USED, SHARED, RESERVED = ".", "x", "c", "u", "s", "r"


@dataclass(frozen=True)
class PageMap:
    """The page array between two steps: page tables, cached pages, holes, host pages."""

    num_pages: int
    block_size: int
    tables: dict[int, list[int]]  # seq_id -> its device pages in logical order (copies)
    computed: dict[int, int]  # seq_id -> tokens whose K/V its pages hold
    cached: list[int] = field(default_factory=list)  # cached-free pages, the next evicted first
    holes: list[tuple[int, int]] = field(default_factory=list)  # (first page, length): free runs, contiguous only
    reserved: bool = False  # a table's pages past its tokens are a reservation (contiguous layouts)
    copied: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> indices of pages it got by copying
    num_host_pages: int = 0
    host: dict[int, list[int]] = field(default_factory=dict)  # swapped-out seq_id -> its host pages
    min_pending_pages: int | None = None  # the smallest reservation a waiting request needs (contiguous)
    # seq_id -> the contiguous runs it holds for its samples not forked yet (in use, never written)
    spare: dict[int, list[int]] = field(default_factory=dict)

    def states(self) -> str:
        """One character per page (the module's table); holes shorter than ``min_pending_pages`` are ``x``."""
        chars = bytearray(FREE.encode()) * self.num_pages
        used, shared, reserved = ord(USED), ord(SHARED), ord(RESERVED)
        for page in self.cached:
            chars[page] = ord(CACHED)
        holders = Counter(chain.from_iterable(self.tables.values()))  # a page's reference count
        for page, count in holders.items():
            chars[page] = used if count == 1 else shared
        if self.reserved:  # a run's pages past its written tokens hold nothing yet (a run is never shared)
            for seq_id, pages in self.tables.items():
                for page in pages[-(-self.computed.get(seq_id, 0) // self.block_size):]:
                    chars[page] = reserved
        for page in chain.from_iterable(self.spare.values()):
            chars[page] = reserved
        if self.min_pending_pages is not None:
            for start, length in self.holes:
                if length < self.min_pending_pages:
                    chars[start:start + length] = FRAGMENT.encode() * length
        return chars.decode()
