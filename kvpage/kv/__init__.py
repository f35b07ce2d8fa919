"""The paged KV-cache memory manager (pure Python, no torch).

* :mod:`kvpage.kv.page_pool`: physical pages, reference counts, free and
  cached-free queues, the prefix-cache index.
* :mod:`kvpage.kv.prefix_hash`: chained content hashes of full pages.
* :mod:`kvpage.kv.manager`: block tables of sequences, prefix-cache lookup,
  fork with copy-on-write, accounting.
* :mod:`kvpage.kv.contiguous`: the pre-paging baseline, one contiguous
  reservation per sequence, with the same interface.
* :mod:`kvpage.kv.waste`: where the memory goes, by kind of waste.
"""

from kvpage.kv.contiguous import ContiguousKVCacheManager
from kvpage.kv.manager import BlockTable, KVCacheManager, KVUsage, PageCopy
from kvpage.kv.page_pool import Page, PagePool, PageState, PrefixHit
from kvpage.kv.prefix_hash import page_hash
from kvpage.kv.waste import KVWaste

__all__ = [
    "BlockTable",
    "ContiguousKVCacheManager",
    "KVCacheManager",
    "KVUsage",
    "KVWaste",
    "Page",
    "PageCopy",
    "PagePool",
    "PageState",
    "PrefixHit",
    "page_hash",
]
