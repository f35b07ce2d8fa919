"""The paged memory manager alone: unit cases and a stateful property test.

The property test drives random sequences of new/append/fork/free/evict
operations and keeps a shadow "physical memory" (which token sits in which
slot of which page), so it checks not just the bookkeeping invariants but
that every sequence's page table really reads back its own tokens, through
prefix hits and copy-on-write copies.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from kvpage.kv import Claim, KVCacheManager, PageState
from kvpage.modes import PREFIX_HASHES, PrefixHash


def test_block_size_validation() -> None:
    for bad in (0, 3, 512, 12):
        with pytest.raises(ValueError, match="block_size"):
            KVCacheManager(8, bad)


def test_grows_one_page_at_a_time_and_frees() -> None:
    kv = KVCacheManager(num_pages=8, block_size=4, enable_prefix_caching=False)
    assert kv.allocate(0, 3) == []
    kv.commit(0, [1, 2, 3], 3)
    assert len(kv.page_ids(0)) == 1
    assert kv.allocate(0, 1) == []
    kv.commit(0, [1, 2, 3, 4], 4)
    assert len(kv.page_ids(0)) == 1
    kv.allocate(0, 1)
    assert len(kv.page_ids(0)) == 2
    kv.commit(0, [1, 2, 3, 4, 5], 5)
    usage = kv.usage()
    assert usage.num_pages_used == 2 and usage.num_tokens_stored == 5
    assert usage.internal_fragmentation_slots == 3
    kv.free(0)
    assert kv.usage().num_pages_free == 8 and kv.usage().num_pages_used == 0


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_pages=2, block_size=4)
    assert kv.allocate(0, 8) == []
    before = kv.usage()
    assert kv.allocate(1, 1) is None
    assert kv.usage() == before and not kv.has_sequence(1)


@pytest.mark.parametrize("prefix_hash", PREFIX_HASHES)
def test_prefix_hit_reuses_full_pages_but_not_the_last_token(prefix_hash: PrefixHash) -> None:
    kv = KVCacheManager(num_pages=16, block_size=4, prefix_hash=prefix_hash)
    tokens = list(range(12))
    kv.allocate(0, 12)
    kv.commit(0, tokens, 12)
    kv.free(0)
    assert kv.usage().num_pages_cached_free == 3
    # Exactly three full pages of prompt: the third holds the last token, so only two are reused.
    hit = kv.find_cached_prefix(tokens)
    assert hit.num_tokens == 8
    hit = kv.find_cached_prefix(tokens + [99])
    assert hit.num_tokens == 12
    kv.allocate(1, 1, Claim(13, hit=hit))
    kv.record_prefix_query(13, hit.num_tokens)
    assert kv.usage().num_pages_cached_free == 0
    assert kv.usage().num_prefix_cache_hits == 12 and kv.usage().num_prefix_cache_queries == 13
    # A different second page breaks the chain even if the third matches.
    other = tokens[:4] + [7, 7, 7, 7] + tokens[8:] + [1]
    assert kv.find_cached_prefix(other).num_tokens == 4


def test_lru_evicts_oldest_cached_page_only_when_needed() -> None:
    kv = KVCacheManager(num_pages=4, block_size=2)
    for seq, tokens in enumerate(([1, 2], [3, 4], [5, 6])):
        kv.allocate(seq, 2)
        kv.commit(seq, tokens, 2)
        kv.free(seq)
    assert kv.usage().num_pages_cached_free == 3 and kv.usage().num_evictions == 0
    kv.allocate(10, 2)  # takes the one free page: no eviction
    assert kv.usage().num_evictions == 0
    kv.allocate(11, 2)  # must evict: the oldest is [1, 2]
    assert kv.usage().num_evictions == 1
    assert kv.find_cached_prefix([1, 2, 0]).num_tokens == 0
    assert kv.find_cached_prefix([3, 4, 0]).num_tokens == 2


def test_fork_shares_pages_and_copies_before_writing_a_shared_partial_page() -> None:
    kv = KVCacheManager(num_pages=8, block_size=4)
    kv.allocate(0, 6)
    kv.commit(0, list(range(6)), 6)
    kv.fork(0, 1)
    assert kv.page_ids(0) == kv.page_ids(1)
    assert kv.usage().num_pages_used == 2
    copies = kv.allocate(1, 1)
    assert copies is not None and len(copies) == 1
    src, dst = copies[0]
    assert src == kv.page_ids(0)[1] and dst == kv.page_ids(1)[1] and src != dst
    assert kv.page_ids(0)[0] == kv.page_ids(1)[0]  # the full page stays shared
    assert kv.allocate(0, 1) == []  # the parent now owns its partial page alone
    kv.free(0)
    kv.free(1)
    assert kv.usage().num_pages_used == 0


def test_duplicate_content_is_indexed_once() -> None:
    kv = KVCacheManager(num_pages=8, block_size=2)
    for seq in (0, 1):
        kv.allocate(seq, 2)
        kv.commit(seq, [5, 6], 2)
    kv.free(0)
    kv.free(1)
    usage = kv.usage()
    assert usage.num_pages_cached_free == 1 and usage.num_pages_free == 7


TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=14)


class KVManagerMachine(RuleBasedStateMachine):
    """Random operations against the manager, checked against a shadow of the slots."""

    sequences = Bundle("sequences")

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(4, 20), caching=st.booleans(),
                prefix_hash=st.sampled_from(PREFIX_HASHES))
    def setup(self, block_size: int, num_pages: int, caching: bool, prefix_hash: PrefixHash) -> None:
        self.kv = KVCacheManager(num_pages, block_size, enable_prefix_caching=caching, prefix_hash=prefix_hash)
        self.tokens: dict[int, list[int]] = {}
        self.slots: dict[int, list[tuple[int, ...] | None]] = {p: [None] * block_size for p in range(num_pages)}
        self.next_id = 0

    def _write(self, seq_id: int, start: int, end: int) -> None:
        bs = self.kv.block_size
        pages = self.kv.page_ids(seq_id)
        for pos in range(start, end):
            # K/V at a position depends on every token up to it, so the shadow stores the whole prefix.
            self.slots[pages[pos // bs]][pos % bs] = tuple(self.tokens[seq_id][: pos + 1])

    def _apply(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            assert self.kv.pool.pages[src].ref_count >= 1
            self.slots[dst] = list(self.slots[src])

    @rule(target=sequences, tokens=TOKENS)
    def new_sequence(self, tokens: list[int]) -> int | None:
        hit = self.kv.find_cached_prefix(tokens)
        bs = self.kv.block_size
        for i, page in enumerate(hit.pages):  # a hit must hold exactly the request's tokens
            assert page.token_ids == tuple(tokens[i * bs : (i + 1) * bs])
            assert self.slots[page.page_id] == [tuple(tokens[: p + 1]) for p in range(i * bs, (i + 1) * bs)]
        assert hit.num_tokens < len(tokens)
        seq_id = self.next_id
        copies = self.kv.allocate(seq_id, len(tokens) - hit.num_tokens, Claim(len(tokens), hit=hit))
        if copies is None:
            return None
        self.next_id += 1
        self.tokens[seq_id] = list(tokens)
        self._apply(copies)
        self._write(seq_id, hit.num_tokens, len(tokens))
        self.kv.commit(seq_id, tokens, len(tokens))
        return seq_id

    @rule(seq_id=sequences, extra=TOKENS)
    def append(self, seq_id: int | None, extra: list[int]) -> None:
        if seq_id is None or seq_id not in self.tokens:
            return
        copies = self.kv.allocate(seq_id, len(extra))
        if copies is None:
            return
        start = len(self.tokens[seq_id])
        self.tokens[seq_id].extend(extra)
        self._apply(copies)
        self._write(seq_id, start, len(self.tokens[seq_id]))
        self.kv.commit(seq_id, self.tokens[seq_id], len(self.tokens[seq_id]))

    @rule(target=sequences, parent=sequences)
    def fork(self, parent: int | None) -> int | None:
        if parent is None or parent not in self.tokens:
            return None
        child = self.next_id
        self.next_id += 1
        self.kv.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        return child

    @rule(seq_id=consumes(sequences))
    def free(self, seq_id: int | None) -> None:
        if seq_id is None or seq_id not in self.tokens:
            return
        self.kv.free(seq_id)
        del self.tokens[seq_id]

    @rule()
    def evict_cached(self) -> None:
        self.kv.reset_prefix_cache()
        assert self.kv.usage().num_pages_cached_free == 0

    @invariant()
    def bookkeeping_holds(self) -> None:
        if not hasattr(self, "kv"):
            return
        pool = self.kv.pool
        free_ids, cached_ids = pool.free_queue_ids(), pool.cached_free_ids()
        assert len(set(free_ids)) == len(free_ids) and not set(free_ids) & set(cached_ids)
        refs = Counter(p for s in self.tokens for p in self.kv.page_ids(s))
        for page in pool.pages:
            assert page.ref_count >= 0
            assert page.ref_count == refs[page.page_id]
            in_states = [page.page_id in free_ids, page.page_id in cached_ids, page.ref_count > 0]
            assert sum(in_states) == 1, f"page {page.page_id} is in {sum(in_states)} states"
        usage = self.kv.usage()
        assert usage.num_pages_used + usage.num_pages_cached_free + usage.num_pages_free == usage.num_pages_total
        assert usage.num_pages_used == len(refs)
        bs = self.kv.block_size
        stored = 0
        for seq_id, tokens in self.tokens.items():
            table = self.kv.page_ids(seq_id)
            assert len(table) == -(-len(tokens) // bs)
            read_back = [self.slots[table[pos // bs]][pos % bs] for pos in range(len(tokens))]
            expected = [tuple(tokens[: pos + 1]) for pos in range(len(tokens))]
            assert read_back == expected, f"sequence {seq_id} reads back wrong K/V"
        for page_id in refs:
            stored += pool.pages[page_id].num_filled
        assert usage.num_tokens_stored == stored

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for seq_id in list(self.tokens):
            self.kv.free(seq_id)
        states = self.kv.pool.all_page_states()
        assert states[PageState.IN_USE] == 0
        assert all(p.ref_count == 0 for p in self.kv.pool.pages)
        assert states[PageState.FREE] + states[PageState.CACHED_FREE] == self.kv.num_pages


KVManagerMachine.TestCase.settings = settings(
    max_examples=1000, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)
TestKVManagerProperties = KVManagerMachine.TestCase
