"""The pre-paging baseline: one contiguous reservation per sequence, first fit.

Before PagedAttention, servers such as FasterTransformer and Orca gave each
request one contiguous run of KV slots for its whole possible length, chosen
when the request was admitted.  :class:`ContiguousKVCacheManager` does the
same inside kvpage's KV memory, so both layouts run through the very same
scheduler, runner and attention code and only the memory layout differs:

* a sequence's reservation is a run of consecutive pages, so its page table
  is ``[start, start + 1, ...]``; the attention code cannot tell the
  difference, but the allocator can: holes between reservations that are
  too small for the next request are **external fragmentation**;
* the reservation is made whole at admission, for ``prompt + max_tokens``
  (``contiguous-request``) or ``max_model_len`` (``contiguous-max``) tokens;
  the slots not yet written are **reservation waste**;
* nothing is shared: no prefix caching, and each of the ``n`` samples of a
  request gets its own reservation (taken at admission, all or nothing) and
  its own copy of the prompt's K/V when the samples fork.

Holes are found first fit in address order and merged with their neighbours
when freed.  The interface is :class:`~kvpage.kv.manager.KVCacheManager`'s.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvpage.kv.interface import Claim, KVUsage, PageCopy
from kvpage.kv.page_map import PageMap
from kvpage.kv.page_pool import PrefixHit
from kvpage.kv.waste import KVWaste


@dataclass
class _Reservation:
    start: int  # first page id
    num_pages: int
    num_computed_tokens: int = 0
    num_copied: int = 0  # leading pages holding a copy of the parent's K/V (a forked sample)
    _page_ids: list[int] | None = None

    @property
    def page_ids(self) -> list[int]:
        """The run's pages, listed when first asked for (the planner never asks: a list a reservation is costly)."""
        if self._page_ids is None:
            self._page_ids = list(range(self.start, self.start + self.num_pages))
        return self._page_ids


ContiguousLayout = Literal["contiguous-request", "contiguous-max"]


class ContiguousKVCacheManager:
    """First-fit contiguous reservations over the page array; a :class:`~kvpage.kv.interface.KVManager`."""

    enable_prefix_caching = False
    num_evictions = 0  # nothing is cached, so nothing is evicted

    def __init__(self, num_pages: int, block_size: int, layout: ContiguousLayout = "contiguous-request",
                 max_model_len: int | None = None) -> None:
        if block_size < 1 or block_size > 256 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two from 1 to 256, got {block_size}")
        if num_pages < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_pages}")
        if layout == "contiguous-max" and max_model_len is None:
            raise ValueError("kv_layout 'contiguous-max' reserves max_model_len tokens a sequence: give max_model_len")
        self.layout: ContiguousLayout = layout
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_pages = num_pages
        self._holes: list[tuple[int, int]] = [(0, num_pages)]  # (start, length), sorted by start
        self._tables: dict[int, _Reservation] = {}
        self._spare: dict[int, list[_Reservation]] = {}  # reservations waiting for a parent's forks
        self._pending_copies: dict[int, list[PageCopy]] = {}
        self._pages_in_use = 0
        self._tokens_stored = 0  # the sum of every table's num_computed_tokens, kept as they change
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----- queries ---------------------------------------------------------------
    def pages_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_available_pages(self) -> int:
        """The largest hole: what one new reservation can get."""
        return max((length for _, length in self._holes), default=0)

    @property
    def num_pages_in_use(self) -> int:
        return self._pages_in_use

    @property
    def num_tokens_stored(self) -> int:
        return self._tokens_stored

    def copies_before_write(self, seq_id: int) -> bool:
        """Whether a forked sample still waits for its copy of the parent's K/V (a reservation is private)."""
        return seq_id in self._pending_copies

    def reservation_tokens(self, full_tokens: int) -> int:
        """The run reserved at admission: the sequence's whole possible length, or ``max_model_len``."""
        if self.layout == "contiguous-max":
            assert self.max_model_len is not None  # checked in __init__
            return self.max_model_len
        return full_tokens

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def page_ids(self, seq_id: int) -> list[int]:
        return self._tables[seq_id].page_ids

    def find_cached_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        return PrefixHit()

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        pass

    def reset_prefix_cache(self) -> int:
        return 0

    # ----- holes -----------------------------------------------------------------------
    def _take(self, num_pages: int) -> _Reservation | None:
        for i, (start, length) in enumerate(self._holes):
            if length >= num_pages:
                if length == num_pages:
                    del self._holes[i]
                else:
                    self._holes[i] = (start + num_pages, length - num_pages)
                self._pages_in_use += num_pages
                return _Reservation(start, num_pages)
        return None

    def _give_back(self, reservation: _Reservation) -> None:
        start, length = reservation.start, reservation.num_pages
        self._pages_in_use -= length
        i = bisect.bisect_left(self._holes, (start, 0))
        if i < len(self._holes) and self._holes[i][0] == start + length:  # merge with the next hole
            length += self._holes.pop(i)[1]
        if i > 0 and self._holes[i - 1][0] + self._holes[i - 1][1] == start:  # and the previous one
            start, prev_length = self._holes.pop(i - 1)
            length += prev_length
            i -= 1
        self._holes.insert(i, (start, length))

    # ----- allocation ----------------------------------------------------------------
    def pages_needed(self, seq_id: int, num_new_tokens: int, claim: Claim | None = None) -> int:
        """Pages a first allocation reserves (the whole reservation, for every sample); 0 afterwards."""
        if seq_id in self._tables:
            return 0
        return self._run_pages(num_new_tokens, claim) * (claim.num_samples if claim is not None else 1)

    def _run_pages(self, num_new_tokens: int, claim: Claim | None) -> int:
        reserve = self.reservation_tokens(claim.full_tokens) if claim is not None else 0
        return self.pages_for_tokens(max(reserve, num_new_tokens))

    def allocate(self, seq_id: int, num_new_tokens: int, claim: Claim | None = None) -> list[PageCopy] | None:
        """Reserve on first use: one run per sample of the claim, each of its reservation's size.

        Returns the page copies due before this sequence's next step (a forked
        sample's copy of its parent's K/V), or ``None`` if no hole fits.
        """
        table = self._tables.get(seq_id)
        if table is None:
            per_sequence = self._run_pages(num_new_tokens, claim)
            taken: list[_Reservation] = []
            for _ in range(claim.num_samples if claim is not None else 1):
                reservation = self._take(per_sequence)
                if reservation is None:
                    for r in taken:
                        self._give_back(r)
                    return None
                taken.append(reservation)
            self._tables[seq_id] = taken[0]
            if len(taken) > 1:
                self._spare[seq_id] = taken[1:]
            return []
        if table.num_computed_tokens + num_new_tokens > table.num_pages * self.block_size:
            raise ValueError(f"sequence {seq_id} outgrew its contiguous reservation of {table.num_pages} pages")
        return self._pending_copies.pop(seq_id, [])

    def grow(self, seq_ids: Sequence[int]) -> None:
        raise ValueError(f"a {self.layout} reservation never grows: it holds every slot its sequence may write")

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        table = self._tables[seq_id]
        self._tokens_stored += num_computed_tokens - table.num_computed_tokens
        table.num_computed_tokens = num_computed_tokens

    def index_full_pages(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """No prefix cache in a contiguous layout: nothing to index."""

    def can_fork(self, parent_id: int) -> bool:
        """Whether a child of ``parent_id`` can get a reservation: a spare one, or a hole as large."""
        parent = self._tables.get(parent_id)
        return parent is not None and (bool(self._spare.get(parent_id))
                                       or any(length >= parent.num_pages for _, length in self._holes))

    def fork(self, parent_id: int, child_id: int) -> None:
        """Give the child one of the reservations taken for it, and queue the copy of the parent's K/V."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already has a page table")
        parent = self._tables[parent_id]
        spare = self._spare.get(parent_id)
        child = spare.pop() if spare else self._take(parent.num_pages)
        if child is None:
            raise ValueError(f"no contiguous room to fork sequence {parent_id}; reserve its samples at admission")
        if spare == []:
            del self._spare[parent_id]
        child.num_computed_tokens = parent.num_computed_tokens
        self._tokens_stored += child.num_computed_tokens
        self._tables[child_id] = child
        used = self.pages_for_tokens(parent.num_computed_tokens)
        child.num_copied = used
        self._pending_copies[child_id] = [(parent.start + i, child.start + i) for i in range(used)]

    # ----- swap: a contiguous layout always recomputes -----------------------------------
    def swap_out(self, seq_id: int) -> None:
        """Never: a reservation's place cannot be promised back, so preempted sequences recompute."""
        return None

    def swap_in(self, seq_id: int) -> None:
        raise ValueError(f"sequence {seq_id} was never swapped out: a contiguous layout does not swap")

    def swapped_pages(self, seq_id: int) -> int:
        raise ValueError(f"sequence {seq_id} was never swapped out: a contiguous layout does not swap")

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self._tokens_stored -= table.num_computed_tokens
        self._pending_copies.pop(seq_id, None)
        for reservation in self._spare.pop(seq_id, []) + ([table] if table is not None else []):
            self._give_back(reservation)

    # ----- accounting ------------------------------------------------------------------
    def page_map(self, min_pending_pages: int | None = None) -> PageMap:
        """The runs (a sample's run not forked yet counts as its parent's reservation) and the holes."""
        runs = self._tables
        return PageMap(self.num_pages, self.block_size, {seq_id: list(r.page_ids) for seq_id, r in runs.items()},
                       {seq_id: r.num_computed_tokens for seq_id, r in runs.items()}, holes=list(self._holes),
                       reserved=True,
                       copied={seq_id: list(range(r.num_copied)) for seq_id, r in runs.items() if r.num_copied},
                       min_pending_pages=min_pending_pages,
                       spare={seq_id: [page for r in spare for page in r.page_ids]
                              for seq_id, spare in self._spare.items()})

    def usage(self) -> KVUsage:
        stored = self.num_tokens_stored
        return KVUsage(block_size=self.block_size, num_pages_total=self.num_pages,
                       num_pages_used=self._pages_in_use, num_pages_cached_free=0,
                       num_pages_free=self.num_pages - self._pages_in_use, num_tokens_stored=stored,
                       num_prefix_cache_queries=0, num_prefix_cache_hits=0, num_evictions=0)

    def waste(self, reserved_pages: int = 0, min_pending_pages: int | None = None) -> KVWaste:
        """Snapshot by kind. ``min_pending_pages``: the smallest reservation a waiting request needs.

        A contiguous reservation holds back its own slots, so ``reserved_pages`` (admission's) adds nothing.
        """
        touched = sum([-(-t.num_computed_tokens // self.block_size) for t in self._tables.values()])
        external = 0
        if min_pending_pages is not None:
            external = sum(length for _, length in self._holes if length < min_pending_pages) * self.block_size
        return self.waste_given(self._tokens_stored, touched, reserved_pages, external)

    def waste_given(self, stored_slots: int, touched_pages: int, reserved_pages: int = 0,
                    external_slots: int = 0, pages_in_use: int | None = None) -> KVWaste:
        """The snapshot from its sums: the last touched page of a run is internal fragmentation, the rest reserved."""
        bs = self.block_size
        in_use = self._pages_in_use if pages_in_use is None else pages_in_use
        # Positional, in KVWaste's field order (total, stored, internal, reserved, external, in use, unshared):
        # the planner makes one every virtual step.
        return KVWaste(self.num_pages * bs, stored_slots, touched_pages * bs - stored_slots,
                       (in_use - touched_pages) * bs, external_slots, in_use, in_use)
