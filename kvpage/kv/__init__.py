"""The paged KV-cache memory manager (pure Python, no torch).

* :mod:`kvpage.kv.page_pool`: physical pages, reference counts, free and
  cached-free queues, the prefix-cache index.
* :mod:`kvpage.kv.prefix_hash`: chained content hashes of full pages.
* :mod:`kvpage.kv.manager`: block tables of sequences, prefix-cache lookup,
  fork with copy-on-write, accounting.
"""

from kvpage.kv.manager import BlockTable, KVCacheManager, KVUsage, PageCopy
from kvpage.kv.page_pool import Page, PagePool, PageState, PrefixHit
from kvpage.kv.prefix_hash import page_hash

__all__ = [
    "BlockTable",
    "KVCacheManager",
    "KVUsage",
    "Page",
    "PageCopy",
    "PagePool",
    "PageState",
    "PrefixHit",
    "page_hash",
]
