"""The KV manager's interface: what the scheduler may ask of any memory layout (pure Python).

The scheduler never knows how pages are handed out.  It talks to a
:class:`KVManager`, which the paged manager (:mod:`kvpage.kv.manager`) and
the contiguous baseline (:mod:`kvpage.kv.contiguous`) both implement, and
learns the layout from the manager's ``layout`` attribute, never from a
second setting.  :func:`kvpage.kv.factory.make_kv_manager` builds the one
for a layout; the engine and the planner both call it.

A sequence meets its manager in this order: ``find_cached_prefix`` (the
prefix it can skip), ``allocate`` with a :class:`Claim` (its first pages,
or its whole reservation), then per step ``allocate`` (room for the step's
tokens) and ``commit`` (they are computed), perhaps ``fork``, ``swap_out``
and ``swap_in``, and at last ``free``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvpage.kv.page_map import PageMap
from kvpage.kv.page_pool import PrefixHit
from kvpage.kv.waste import KVWaste
from kvpage.modes import KVLayout

PageCopy = tuple[int, int]  # (from page, to page)


@dataclass(frozen=True)
class KVUsage:
    """A snapshot of the cache, in pages and token slots."""

    block_size: int
    num_pages_total: int
    num_pages_used: int
    num_pages_cached_free: int
    num_pages_free: int
    num_tokens_stored: int
    num_prefix_cache_queries: int
    num_prefix_cache_hits: int
    num_evictions: int

    @property
    def internal_fragmentation_slots(self) -> int:
        """Slots in in-use pages that hold no token."""
        return self.num_pages_used * self.block_size - self.num_tokens_stored

    @property
    def internal_fragmentation(self) -> float:
        """Empty slots in used pages as a fraction of all KV slots."""
        return self.internal_fragmentation_slots / (self.num_pages_total * self.block_size)

    @property
    def usage_fraction(self) -> float:
        return self.num_pages_used / self.num_pages_total


@dataclass(frozen=True, slots=True)
class Claim:
    """What a sequence tells its manager when it first asks for pages.

    The paged manager starts it from ``hit``; a contiguous one reserves
    ``num_samples`` runs sized for ``full_tokens`` (or for ``max_model_len``)
    at once, all or nothing.
    """

    full_tokens: int  # K/V slots it can ever fill: prompt + max_tokens - 1
    num_samples: int = 1  # sequences it brings: pending parallel samples, or a beam search's beams
    hit: PrefixHit = field(default_factory=PrefixHit)


class KVManager(Protocol):
    """Page tables of sequences over a fixed number of pages of ``block_size`` token slots."""

    @property
    def layout(self) -> KVLayout: ...

    @property
    def block_size(self) -> int: ...

    @property
    def num_pages(self) -> int: ...

    @property
    def enable_prefix_caching(self) -> bool: ...

    @property
    def num_available_pages(self) -> int:
        """Pages one new allocation can get now (paged: free and cached-free; contiguous: the largest hole)."""

    @property
    def num_pages_in_use(self) -> int: ...

    @property
    def num_evictions(self) -> int:
        """Cached-free pages evicted so far."""

    @property
    def num_tokens_stored(self) -> int:
        """Token slots holding K/V in pages in use (a shared page counts once)."""

    def pages_for_tokens(self, num_tokens: int) -> int: ...

    def reservation_tokens(self, full_tokens: int) -> int | None:
        """Slots a sequence of at most ``full_tokens`` reserves at admission; None when pages come on demand."""

    def has_sequence(self, seq_id: int) -> bool: ...

    def page_ids(self, seq_id: int) -> list[int]:
        """The sequence's page ids in logical order (the live list: read it, don't keep it)."""

    # ----- prefix cache -----
    def find_cached_prefix(self, token_ids: Sequence[int]) -> PrefixHit: ...

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None: ...

    def reset_prefix_cache(self) -> int: ...

    # ----- pages for a step -----
    def pages_needed(self, seq_id: int, num_new_tokens: int, claim: Claim | None = None) -> int:
        """Available pages that :meth:`allocate` would take now."""

    def allocate(self, seq_id: int, num_new_tokens: int, claim: Claim | None = None) -> list[PageCopy] | None:
        """Room for ``num_new_tokens`` more tokens (a sequence seen first needs its ``claim``).

        Returns the page copies due before the step, or None, with nothing
        changed, when the pages are not there.
        """

    def grow(self, seq_ids: Sequence[int]) -> None:
        """One fresh page each: these sequences' tokens, committed or not, fill their last page.

        The planner's decode fast-forward grows tables this way, committing
        later; paging only (a reservation never grows).  The caller has
        checked ``num_available_pages``.
        """

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None: ...

    def index_full_pages(self, seq_id: int, token_ids: Sequence[int]) -> None: ...

    # ----- sharing -----
    def copies_before_write(self, seq_id: int) -> bool:
        """Whether the sequence's next token must wait for a page copy (copy-on-write, or a fork's copy)."""

    def can_fork(self, parent_id: int) -> bool: ...

    def fork(self, parent_id: int, child_id: int) -> None: ...

    # ----- swap -----
    def swap_out(self, seq_id: int) -> list[PageCopy] | None:
        """Move a sequence's pages to host memory: the (device, host) copies, or None if it cannot."""

    def swap_in(self, seq_id: int) -> list[PageCopy] | None:
        """Bring a swapped-out sequence back: the (host, device) copies, or None if the pages are not there."""

    def swapped_pages(self, seq_id: int) -> int: ...

    def free(self, seq_id: int) -> None: ...

    # ----- accounting -----
    def page_map(self, min_pending_pages: int | None = None) -> PageMap:
        """The page array now, copied (for the dashboard: :mod:`kvpage.kv.page_map`)."""

    def usage(self) -> KVUsage: ...

    def waste(self, reserved_pages: int = 0, min_pending_pages: int | None = None) -> KVWaste: ...

    def waste_given(self, stored_slots: int, touched_pages: int, reserved_pages: int = 0,
                    external_slots: int = 0, pages_in_use: int | None = None) -> KVWaste:
        """:meth:`waste` from its two sums, for a caller that keeps them (the planner's decode fast-forward).

        ``stored_slots`` is :attr:`num_tokens_stored`; ``touched_pages`` the
        pages the sequences' tokens occupy, each sequence counted alone
        (``pages_for_tokens`` of its computed tokens, summed); ``pages_in_use``
        stands for :attr:`num_pages_in_use` (a step the caller has moved past).
        The snapshot is affine in these three, field by field, which the
        fast-forward's bulk recording relies on.
        """
