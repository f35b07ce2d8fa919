"""The page pool's LRU queue of cached-free pages against the plain rules it implements.

The pool keeps its LRU as a deque with lazy deletion (a revived page's
entry goes stale instead of being searched for). The reference here keeps
the same rules the obvious way, with an ``OrderedDict``: random operations
must leave both with the same pages in each state, the same queues in the
same order, and the same page chosen at each allocation (eviction included).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpage.kv.page_pool import PagePool, PageState


class ReferencePool:
    """Free queue, OrderedDict LRU (oldest release first), ref counts and a hash index, by page id."""

    def __init__(self, num_pages: int) -> None:
        self.free = deque(range(num_pages))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.refs = [0] * num_pages
        self.keys: dict[int, bytes] = {}
        self.index: dict[bytes, int] = {}
        self.evictions = 0

    def allocate(self) -> int:
        if self.free:
            page = self.free.popleft()
        else:
            page, _ = self.lru.popitem(last=False)
            del self.index[self.keys.pop(page)]
            self.evictions += 1
        self.refs[page] = 1
        return page

    def share(self, page: int) -> None:
        if self.refs[page] == 0:
            del self.lru[page]
        self.refs[page] += 1

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self.keys:
                self.lru[page] = None
            else:
                self.free.append(page)

    def register(self, page: int, key: bytes) -> None:
        if page not in self.keys and key not in self.index:
            self.keys[page] = key
            self.index[key] = page

    def clear(self) -> None:
        for page in self.lru:
            del self.index[self.keys.pop(page)]
            self.free.append(page)
        self.lru.clear()


OPERATIONS = st.sampled_from(["allocate", "share", "revive", "release", "register", "clear"])


@settings(max_examples=400, deadline=None)
@given(num_pages=st.integers(1, 6), data=st.data())
def test_the_lazy_lru_queue_keeps_the_plain_rules(num_pages: int, data: st.DataObject) -> None:
    pool, ref = PagePool(num_pages, block_size=4), ReferencePool(num_pages)
    for _ in range(data.draw(st.integers(0, 120))):
        operation = data.draw(OPERATIONS)
        in_use = [p for p in range(num_pages) if ref.refs[p]]
        if operation == "allocate" and pool.num_available_pages:
            assert pool.allocate().page_id == ref.allocate()
        elif operation == "share" and in_use:
            page = data.draw(st.sampled_from(in_use))
            pool.share(pool.pages[page])
            ref.share(page)
        elif operation == "revive" and ref.lru:
            page = data.draw(st.sampled_from(list(ref.lru)))
            pool.share(pool.pages[page])
            ref.share(page)
        elif operation == "release" and in_use:
            page = data.draw(st.sampled_from(in_use))
            pool.release(pool.pages[page])
            ref.release(page)
        elif operation == "register" and in_use:
            page, key = data.draw(st.sampled_from(in_use)), bytes([data.draw(st.integers(0, 7))])
            pool.register(pool.pages[page], key, key)
            ref.register(page, key)
        elif operation == "clear":
            assert pool.clear_cache() == len(ref.lru)
            ref.clear()
        assert pool.free_queue_ids() == list(ref.free)
        assert pool.cached_free_ids() == list(ref.lru)
        assert pool.num_cached_free_pages == len(ref.lru)
        assert pool.counters.evictions == ref.evictions
        states = [pool.state_of(page) for page in pool.pages]
        assert states == [PageState.IN_USE if ref.refs[p] else PageState.CACHED_FREE if p in ref.lru
                          else PageState.FREE for p in range(num_pages)]
        # Stale entries stay bounded: the queue is rebuilt before they outnumber the live ones (plus a margin).
        assert len(pool._lru) <= 2 * len(ref.lru) + 65


def test_stale_entries_of_a_page_revived_over_and_over_are_dropped() -> None:
    pool = PagePool(2, block_size=4)
    page = pool.allocate()
    pool.register(page, b"k", b"k")
    for _ in range(1000):  # released into the LRU, revived by a prefix hit, and again, with no eviction between
        pool.release(page)
        pool.share(page)
    assert len(pool._lru) <= 65
    pool.release(page)
    assert pool.cached_free_ids() == [page.page_id]
    assert pool.allocate() is not page  # the free page goes first
    assert pool.allocate() is page and pool.counters.evictions == 1


def test_a_revived_page_released_again_is_the_newest_in_the_lru() -> None:
    pool = PagePool(2, block_size=4)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"a", b"a")
    pool.register(b, b"b", b"b")
    pool.release(a)
    pool.release(b)
    pool.share(a)  # a prefix hit revives a: its first entry, older than b's, goes stale
    pool.release(a)
    assert pool.cached_free_ids() == [b.page_id, a.page_id]
    assert pool.allocate() is b and pool.allocate() is a and pool.counters.evictions == 2
