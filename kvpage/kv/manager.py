"""The KV-cache manager: page tables of sequences on top of the page pool.

A *sequence* (one stream of tokens: a prompt and what was generated after it)
owns a :class:`PageTable`, the list of physical pages that hold its K/V in
logical order. Token ``t`` of the sequence lives in page ``t // block_size`` of
its table, at offset ``t % block_size``. Tables grow one page at a time as
tokens are appended, so the only slack is in the last page.

The manager adds three things to plain allocation:

* **Prefix caching.** When a page fills up, it is indexed by a chained
  content hash (:mod:`kvpage.kv.prefix_hash`). A new sequence starts with the
  longest run of cached full pages matching its tokens, never the page that
  would hold its last prompt token, which is always recomputed so the model
  produces logits for it.
* **Fork with copy-on-write.** A forked child shares all of its parent's pages.
  Shared full pages are never written again. Before a sequence writes into a
  shared, partly filled page, the manager gives it a private copy and returns
  the ``(src, dst)`` page copy that the worker must perform before the step.
* **Accounting**, kept incrementally so it costs O(1) to read.

Nothing here imports torch: the scheduler and the planner use it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvpage.kv.interface import Claim, KVUsage, PageCopy
from kvpage.kv.page_map import PageMap
from kvpage.kv.page_pool import Page, PagePool, PrefixHit
from kvpage.kv.prefix_hash import ROOT_HASH, chain_keys, pack, split
from kvpage.kv.swap import SwappedTable, SwapSpace
from kvpage.kv.waste import KVWaste
from kvpage.modes import KVLayout, PrefixHash


@dataclass
class PageTable:
    """Logical-to-physical page map of one sequence."""

    pages: list[Page] = field(default_factory=list)
    # The same pages by id, kept in step with ``pages`` so that a step can
    # hand it to the runner without building a list per sequence.
    page_ids: list[int] = field(default_factory=list)
    # Chained keys of the leading full pages whose K/V is computed.
    hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    copied: list[int] = field(default_factory=list)  # indices of pages it got by copy-on-write


class KVCacheManager:
    """Allocates, shares and frees pages for sequences, with prefix caching."""

    def __init__(self, num_pages: int, block_size: int, enable_prefix_caching: bool = True,
                 num_swap_pages: int = 0, prefix_hash: PrefixHash = "sha256") -> None:
        if block_size < 1 or block_size > 256 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two from 1 to 256, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._chain_keys = chain_keys(prefix_hash)
        self.pool = PagePool(num_pages, block_size)
        self.swap_space = SwapSpace(num_swap_pages)
        self._tables: dict[int, PageTable] = {}
        self._swapped: dict[int, SwappedTable] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----- queries ------------------------------------------------------------
    @property
    def layout(self) -> KVLayout:
        return "paged"

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_available_pages(self) -> int:
        return self.pool.num_available_pages

    @property
    def num_pages_in_use(self) -> int:
        return self.pool.num_used_pages

    def pages_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_tokens_stored(self) -> int:
        """Token slots holding K/V in pages in use (a shared page counts once)."""
        return self.pool.counters.filled_slots_in_use

    def copies_before_write(self, seq_id: int) -> bool:
        """Whether the sequence's next token lands in a partly filled page another sequence shares."""
        table = self._tables[seq_id]
        done = table.num_computed_tokens
        return done % self.block_size != 0 and table.pages[done // self.block_size].ref_count > 1

    @property
    def num_evictions(self) -> int:
        return self.pool.counters.evictions

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def page_ids(self, seq_id: int) -> list[int]:
        """The live page-id list of a sequence (not a copy: read it, don't keep it)."""
        return self._tables[seq_id].page_ids

    # ----- prefix cache ---------------------------------------------------------
    def find_cached_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """Longest run of cached full pages matching the start of ``token_ids``.

        The page holding the last token is never matched: the model must run
        on at least that token to produce the next one's logits. Takes no
        references; pass the hit to :meth:`allocate`.
        """
        hit = PrefixHit()
        if not self.enable_prefix_caching:
            return hit
        max_pages = (len(token_ids) - 1) // self.block_size
        parent, keys, lookup = ROOT_HASH, self._chain_keys, self.pool.lookup
        for content in split(pack(token_ids[: max_pages * self.block_size]), self.block_size):
            parent = keys(parent, (content,))[0]
            page = lookup(parent, content)
            if page is None:
                break
            hit.pages.append(page)
        hit.num_tokens = len(hit.pages) * self.block_size
        return hit

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's lookup, in tokens (done once per admission, not per attempt)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_query_tokens
            self.prefix_cache_hits += num_hit_tokens

    # ----- allocation -------------------------------------------------------------
    def reservation_tokens(self, full_tokens: int) -> None:
        """Paging reserves nothing at admission: pages come as tokens do."""
        return None

    def pages_needed(self, seq_id: int, num_new_tokens: int, claim: Claim | None = None) -> int:
        """Available pages that :meth:`allocate` would consume for these new tokens."""
        table = self._tables.get(seq_id)
        if table is None:
            hit = claim.hit if claim is not None else None
            num_held = len(hit.pages) if hit else 0
            num_computed = hit.num_tokens if hit else 0
            # Reviving a cached-free hit takes it out of the evictable set.
            revived = sum(1 for p in hit.pages if p.ref_count == 0) if hit else 0
            needed = revived
        else:
            num_held = len(table.pages)
            num_computed = table.num_computed_tokens
            needed = 1 if self._needs_copy(table, num_new_tokens) else 0
        needed += max(0, self.pages_for_tokens(num_computed + num_new_tokens) - num_held)
        return needed

    def allocate(self, seq_id: int, num_new_tokens: int, claim: Claim | None = None) -> list[PageCopy] | None:
        """Make room for ``num_new_tokens`` more tokens of a sequence.

        A sequence the manager has not seen starts from its claim's ``hit``
        (its cached prefix); paging takes the pages this step needs, no more.
        Returns the page copies to perform before the step (copy-on-
        write), or ``None`` if the pool cannot supply the pages, in which case
        nothing changed.
        """
        table = self._tables.get(seq_id)
        if table is not None:
            done, bs = table.num_computed_tokens, self.block_size
            if num_new_tokens <= 0 or done % bs == 0 or table.pages[done // bs].ref_count == 1:
                # Fast path, every decode step: no copy-on-write (_needs_copy, inlined: this runs for
                # every sequence of every step), only fresh pages, if the tokens outgrow the table.
                missing = -(-(done + num_new_tokens) // bs) - len(table.pages)
                if missing <= 0:
                    return []
                if missing > self.pool.num_available_pages:
                    return None
                for _ in range(missing):
                    page = self.pool.allocate()
                    table.pages.append(page)
                    table.page_ids.append(page.page_id)
                return []
        if self.pages_needed(seq_id, num_new_tokens, claim) > self.pool.num_available_pages:
            return None
        if table is None:
            table = PageTable()
            hit = claim.hit if claim is not None else None
            if hit is not None and hit.pages:
                hashes = [page.content_hash for page in hit.pages if page.content_hash is not None]
                if len(hashes) < len(hit.pages):  # a hit is a cached page, which always has its key
                    raise RuntimeError("a prefix hit includes a page with no content hash")
                for page in hit.pages:
                    self.pool.share(page)
                table.pages = list(hit.pages)
                table.page_ids = [p.page_id for p in hit.pages]
                table.hashes = hashes
                table.num_computed_tokens = hit.num_tokens
            self._tables[seq_id] = table
        copies: list[PageCopy] = []
        if self._needs_copy(table, num_new_tokens):
            index = table.num_computed_tokens // self.block_size
            shared = table.pages[index]
            private = self.pool.allocate()
            self.pool.set_filled(private, shared.num_filled)
            self.pool.release(shared)
            table.pages[index] = private
            table.page_ids[index] = private.page_id
            table.copied.append(index)
            copies.append((shared.page_id, private.page_id))
        target = self.pages_for_tokens(table.num_computed_tokens + num_new_tokens)
        while len(table.pages) < target:
            page = self.pool.allocate()
            table.pages.append(page)
            table.page_ids.append(page.page_id)
        return copies

    def grow(self, seq_ids: Sequence[int]) -> None:
        tables, allocate = self._tables, self.pool.allocate
        for seq_id in seq_ids:
            table = tables[seq_id]
            page = allocate()
            table.pages.append(page)
            table.page_ids.append(page.page_id)

    def _needs_copy(self, table: PageTable, num_new_tokens: int) -> bool:
        """Would the next write land in a page that another sequence shares?"""
        if num_new_tokens <= 0 or table.num_computed_tokens % self.block_size == 0:
            return False
        return table.pages[table.num_computed_tokens // self.block_size].ref_count > 1

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Record that the K/V of the first ``num_computed_tokens`` tokens is now in the cache.

        Updates fill counts and, with prefix caching on, indexes pages that
        became full. ``token_ids`` may be shorter than ``num_computed_tokens``
        when the last computed token's id is not known yet (asynchronous
        scheduling): a page is indexed only once all its ids are known, by
        :meth:`index_full_pages`.
        """
        table = self._tables[seq_id]
        bs = self.block_size
        done = table.num_computed_tokens
        first = done // bs
        if done < num_computed_tokens <= first * bs + bs:
            # Fast path: the tokens land in the page being filled (a decode token, mostly).
            self.pool.set_filled(table.pages[first], num_computed_tokens - first * bs)
            table.num_computed_tokens = num_computed_tokens
            if num_computed_tokens % bs:
                return  # no page became full
        else:
            last = self.pages_for_tokens(num_computed_tokens)
            for i in range(first, min(last, len(table.pages))):
                self.pool.set_filled(table.pages[i], min(bs, num_computed_tokens - i * bs))
            table.num_computed_tokens = num_computed_tokens
        self._index(table, token_ids, min(num_computed_tokens, len(token_ids)) // bs)

    def index_full_pages(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Index the computed full pages whose token ids all became known since :meth:`commit`."""
        table = self._tables.get(seq_id)
        if table is not None:
            self._index(table, token_ids, min(table.num_computed_tokens, len(token_ids)) // self.block_size)

    def _index(self, table: PageTable, token_ids: Sequence[int], num_full: int) -> None:
        """Put the table's first ``num_full`` pages in the prefix-cache index (those not there yet)."""
        if not self.enable_prefix_caching or len(table.hashes) >= num_full:
            return
        bs = self.block_size
        first = len(table.hashes)
        contents = split(pack(token_ids[first * bs : num_full * bs]), bs)
        keys = self._chain_keys(table.hashes[-1] if table.hashes else ROOT_HASH, contents)
        register = self.pool.register
        for page, key, content in zip(table.pages[first:num_full], keys, contents):
            register(page, key, content)
        table.hashes += keys

    def can_fork(self, parent_id: int) -> bool:
        return parent_id in self._tables  # sharing needs no free page

    def fork(self, parent_id: int, child_id: int) -> None:
        """Give ``child_id`` a table sharing every page of ``parent_id``."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already has a page table")
        parent = self._tables[parent_id]
        for page in parent.pages:
            self.pool.share(page)
        self._tables[child_id] = PageTable(
            pages=list(parent.pages), page_ids=list(parent.page_ids), hashes=list(parent.hashes),
            num_computed_tokens=parent.num_computed_tokens,
        )

    # ----- swap ----------------------------------------------------------------------
    def swap_out(self, seq_id: int) -> list[PageCopy] | None:
        """Move a sequence's computed pages to the swap space and free its device pages.

        Returns the ``(device page, host page)`` copies to perform before any
        freed page is written again, or None (nothing changed) if the swap
        space is too full.
        """
        table = self._tables[seq_id]
        num_pages = self.pages_for_tokens(table.num_computed_tokens)
        host = self.swap_space.take(num_pages)
        if host is None:
            return None
        copies = [(page.page_id, h) for page, h in zip(table.pages, host)]
        self.free(seq_id)  # the device pages only: nothing is swapped under this id yet
        self._swapped[seq_id] = SwappedTable(host, list(table.hashes), table.num_computed_tokens)
        return copies

    def swap_in(self, seq_id: int) -> list[PageCopy] | None:
        """Give a swapped-out sequence fresh device pages; returns the ``(host, device)`` copies, or None."""
        swapped = self._swapped[seq_id]
        if len(swapped.host_page_ids) > self.pool.num_available_pages:
            return None
        del self._swapped[seq_id]
        table = PageTable(hashes=swapped.hashes, num_computed_tokens=swapped.num_computed_tokens)
        for i in range(len(swapped.host_page_ids)):
            page = self.pool.allocate()
            # Private copies: not in the prefix-cache index (the originals may still be).
            self.pool.set_filled(page, min(self.block_size, swapped.num_computed_tokens - i * self.block_size))
            table.pages.append(page)
            table.page_ids.append(page.page_id)
        self._tables[seq_id] = table
        self.swap_space.give_back(swapped.host_page_ids)
        return [(h, page.page_id) for h, page in zip(swapped.host_page_ids, table.pages)]

    def swapped_pages(self, seq_id: int) -> int:
        return len(self._swapped[seq_id].host_page_ids)

    def free(self, seq_id: int) -> None:
        """Return a sequence's pages. Tail pages go first, so shared prefixes stay cached longest."""
        swapped = self._swapped.pop(seq_id, None)
        if swapped is not None:
            self.swap_space.give_back(swapped.host_page_ids)
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        for page in reversed(table.pages):
            self.pool.release(page)

    def reset_prefix_cache(self) -> int:
        return self.pool.clear_cache()

    # ----- accounting --------------------------------------------------------------
    def page_map(self, min_pending_pages: int | None = None) -> PageMap:
        """Copies of the page tables, the LRU order and the swapped tables (paging has no holes)."""
        tables = self._tables
        return PageMap(self.pool.num_pages, self.block_size, {seq_id: list(t.page_ids) for seq_id, t in tables.items()},
                       {seq_id: t.num_computed_tokens for seq_id, t in tables.items()}, self.pool.cached_free_ids(),
                       copied={seq_id: list(t.copied) for seq_id, t in tables.items() if t.copied},
                       num_host_pages=self.swap_space.num_pages,
                       host={seq_id: list(t.host_page_ids) for seq_id, t in self._swapped.items()})

    def waste(self, reserved_pages: int = 0, min_pending_pages: int | None = None) -> KVWaste:
        """Snapshot by kind (:mod:`kvpage.kv.waste`). ``reserved_pages``: held back by admission, unallocated.

        Paging has no external fragmentation: any free page serves any request.
        """
        touched = sum([-(-t.num_computed_tokens // self.block_size) for t in self._tables.values()])
        return self.waste_given(self.pool.counters.filled_slots_in_use, touched, reserved_pages)

    def waste_given(self, stored_slots: int, touched_pages: int, reserved_pages: int = 0,
                    external_slots: int = 0, pages_in_use: int | None = None) -> KVWaste:
        """The snapshot from its sums: every slot of a page in use that stores nothing is internal fragmentation."""
        bs = self.block_size
        used = self.pool.counters.pages_in_use if pages_in_use is None else pages_in_use
        # Positional, in KVWaste's field order (total, stored, internal, reserved, external, in use, unshared):
        # the planner makes one every virtual step.
        return KVWaste(self.pool.num_pages * bs, stored_slots, used * bs - stored_slots, reserved_pages * bs,
                       external_slots, used, touched_pages)

    def usage(self) -> KVUsage:
        pool = self.pool
        return KVUsage(
            block_size=self.block_size,
            num_pages_total=pool.num_pages,
            num_pages_used=pool.num_used_pages,
            num_pages_cached_free=pool.num_cached_free_pages,
            num_pages_free=pool.num_free_pages,
            num_tokens_stored=pool.counters.filled_slots_in_use,
            num_prefix_cache_queries=self.prefix_cache_queries,
            num_prefix_cache_hits=self.prefix_cache_hits,
            num_evictions=pool.counters.evictions,
        )

