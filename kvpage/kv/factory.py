"""One place that builds the KV manager of a layout (pure Python); the engine and the planner both call it."""

from __future__ import annotations

from kvpage.kv.contiguous import ContiguousKVCacheManager
from kvpage.kv.interface import KVManager
from kvpage.kv.manager import KVCacheManager
from kvpage.modes import KVLayout, PrefixHash


def make_kv_manager(layout: KVLayout, num_pages: int, block_size: int, max_model_len: int, *,
                    enable_prefix_caching: bool = True, num_swap_pages: int = 0,
                    prefix_hash: PrefixHash = "sha256") -> KVManager:
    """The manager of ``num_pages`` pages of ``block_size`` slots for ``layout``.

    Only paging swaps and caches prefixes: the contiguous layouts take
    neither ``num_swap_pages`` nor ``enable_prefix_caching`` and its
    ``prefix_hash`` (a reservation shares nothing and always recomputes).
    """
    if layout == "paged":
        return KVCacheManager(num_pages, block_size, enable_prefix_caching, num_swap_pages, prefix_hash)
    return ContiguousKVCacheManager(num_pages, block_size, layout, max_model_len)
