"""The page pool: every physical KV page, its reference count and its state.

The KV cache is one big array of fixed-size pages (``block_size`` token slots
each). The pool hands pages out and takes them back; it knows nothing about
requests. Each page is in exactly one of three states:

* **free**: holds nothing worth keeping; sits in the free queue.
* **cached-free**: nobody uses it, but it still holds the K/V of a full page
  whose content hash is in the prefix-cache index. It sits in an LRU queue and
  can be revived by a prefix-cache hit, or evicted (oldest first) when a fresh
  page is needed and the free queue is empty.
* **in use**: reference count >= 1 (more than one when requests share it).

All operations are O(1): the free queue is a deque, the hash index a dict,
and the LRU queue a deque with lazy deletion (amortized O(1)). A revived
page's entry is not searched for and removed: it goes stale, and eviction
skips it. A page knows how many entries it has in the queue, so its last
entry, the one of its latest release, is the one that counts. When stale
entries outnumber live ones the queue is rebuilt. It is cheaper than an
``OrderedDict``: a replay puts millions of pages through it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from kvpage.kv.prefix_hash import unpack


class PageState(Enum):
    FREE = "free"
    CACHED_FREE = "cached_free"
    IN_USE = "in_use"


@dataclass(slots=True, eq=False)
class Page:
    """One physical page. ``num_filled`` counts the slots holding computed K/V."""

    page_id: int
    ref_count: int = 0
    num_filled: int = 0
    content_hash: bytes | None = None
    # The tokens whose K/V this page holds, packed (kvpage.kv.prefix_hash.pack), kept with the hash so that a
    # hit can be checked token by token (defence in depth on top of sha256). Bytes, not a tuple of ints: a
    # replay registers millions of pages, and bytes cost less to build and nothing to the garbage collector.
    content: bytes | None = None
    lru_entries: int = 0  # entries in the pool's LRU queue; only the last can be live (see the module docstring)

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        """The tokens of ``content``, unpacked (for tests and debugging)."""
        return None if self.content is None else unpack(self.content)


@dataclass
class PoolCounters:
    """Running totals the pool keeps so that accounting never scans pages."""

    evictions: int = 0
    filled_slots_in_use: int = 0
    pages_in_use: int = 0


class PagePool:
    """Fixed set of pages with ref counts, a free queue, an LRU of cached-free pages and a hash index."""

    def __init__(self, num_pages: int, block_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.block_size = block_size
        self.pages: list[Page] = [Page(page_id=i) for i in range(num_pages)]
        self._free: deque[Page] = deque(self.pages)
        self._lru: deque[Page] = deque()  # cached-free pages, oldest release first, and stale entries
        self._num_cached_free = 0
        self._index: dict[bytes, Page] = {}
        self.counters = PoolCounters()

    # ----- state queries -------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages with nothing in them."""
        return len(self._free)

    @property
    def num_cached_free_pages(self) -> int:
        return self._num_cached_free

    @property
    def num_available_pages(self) -> int:
        """Pages an allocation may take: free ones plus evictable cached ones."""
        return len(self._free) + self._num_cached_free

    @property
    def num_used_pages(self) -> int:
        return self.counters.pages_in_use

    def state_of(self, page: Page) -> PageState:
        if page.ref_count > 0:
            return PageState.IN_USE
        if page.content_hash is not None:  # a page keeps its key only while in use or cached
            return PageState.CACHED_FREE
        return PageState.FREE

    # ----- allocation ------------------------------------------------------
    def allocate(self) -> Page:
        """Take a fresh page (ref count 1). Evicts the oldest cached-free page if no free one is left."""
        if self._free:
            page = self._free.popleft()
        elif self._num_cached_free:
            page = self._evict()
        else:
            raise RuntimeError("page pool exhausted: the caller must check num_available_pages first")
        page.ref_count = 1
        page.num_filled = 0
        self.counters.pages_in_use += 1
        return page

    def share(self, page: Page) -> None:
        """Add one reference; revives a cached-free page."""
        if page.ref_count == 0:
            if page.content_hash is None:
                raise RuntimeError(f"page {page.page_id} is free and holds no cached content")
            self._num_cached_free -= 1  # its LRU entry goes stale
            self.counters.pages_in_use += 1
            self.counters.filled_slots_in_use += page.num_filled
        page.ref_count += 1

    def release(self, page: Page) -> None:
        """Drop one reference. At zero a hashed page joins the LRU, any other page the free queue."""
        if page.ref_count <= 0:
            raise RuntimeError(f"page {page.page_id} released with ref count {page.ref_count}")
        page.ref_count -= 1
        if page.ref_count:
            return
        self.counters.pages_in_use -= 1
        self.counters.filled_slots_in_use -= page.num_filled
        if page.content_hash is not None:
            self._lru.append(page)
            page.lru_entries += 1
            self._num_cached_free += 1
            if len(self._lru) > 2 * self._num_cached_free + 64:
                self._drop_stale_entries()
        else:
            page.num_filled = 0
            self._free.append(page)

    def set_filled(self, page: Page, num_filled: int) -> None:
        """Record how many slots of an in-use page now hold computed K/V."""
        self.counters.filled_slots_in_use += num_filled - page.num_filled
        page.num_filled = num_filled

    # ----- prefix-cache index ------------------------------------------------
    def lookup(self, content_hash: bytes, content: bytes) -> Page | None:
        """The page holding exactly these tokens (packed) under this chained hash, if any."""
        page = self._index.get(content_hash)
        if page is None or page.content != content:
            return None
        return page

    def register(self, page: Page, content_hash: bytes, content: bytes) -> None:
        """Index a full in-use page by its content hash (first page with a given hash wins)."""
        if page.content_hash is not None or content_hash in self._index:
            return
        page.content_hash = content_hash
        page.content = content
        self._index[content_hash] = page

    def _drop_hash(self, page: Page) -> None:
        if page.content_hash is not None:
            del self._index[page.content_hash]
        page.content_hash = None
        page.content = None

    # ----- the LRU queue -------------------------------------------------------
    def _evict(self) -> Page:
        """Take the cached-free page released longest ago out of the cache (there is one)."""
        lru = self._lru
        while True:
            page = lru.popleft()
            page.lru_entries -= 1
            if not page.lru_entries and not page.ref_count and page.content_hash is not None:
                break  # its last entry, and it is cached-free: live
        self._drop_hash(page)
        self._num_cached_free -= 1
        self.counters.evictions += 1
        return page

    def _live_entries(self) -> list[Page]:
        """The cached-free pages in LRU order: each one's last entry, in queue order."""
        seen: set[int] = set()
        live = []
        for page in reversed(self._lru):
            if page.page_id not in seen:
                seen.add(page.page_id)
                if not page.ref_count and page.content_hash is not None:
                    live.append(page)
        live.reverse()
        return live

    def _drop_stale_entries(self) -> None:
        live = self._live_entries()
        for page in self._lru:
            page.lru_entries = 0
        for page in live:
            page.lru_entries = 1
        self._lru = deque(live)

    def clear_cache(self) -> int:
        """Evict every cached-free page (e.g. to reset the prefix cache). Returns how many."""
        count = 0
        for page in self._live_entries():
            self._drop_hash(page)
            page.num_filled = 0
            self._free.append(page)
            count += 1
        for page in self._lru:
            page.lru_entries = 0
        self._lru.clear()
        self._num_cached_free = 0
        return count

    def all_page_states(self) -> dict[PageState, int]:
        """Count pages by state with a full scan (for tests and debugging, not the hot path)."""
        counts = {state: 0 for state in PageState}
        for page in self.pages:
            counts[self.state_of(page)] += 1
        return counts

    def free_queue_ids(self) -> list[int]:
        return [p.page_id for p in self._free]

    def cached_free_ids(self) -> list[int]:
        """Cached-free pages, the next to be evicted first."""
        return [p.page_id for p in self._live_entries()]


@dataclass
class PrefixHit:
    """Full pages from the prefix cache that match the start of a token sequence."""

    pages: list[Page] = field(default_factory=list)
    num_tokens: int = 0
