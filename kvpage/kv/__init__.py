"""The KV-cache memory manager (pure Python, no torch).

* :mod:`kvpage.kv.interface`: :class:`KVManager`, what the scheduler may ask
  of any layout, and the :class:`Claim` a sequence makes at admission.
* :mod:`kvpage.kv.page_pool`: physical pages, reference counts, free and
  cached-free queues, the prefix-cache index.
* :mod:`kvpage.kv.prefix_hash`: chained content hashes of full pages.
* :mod:`kvpage.kv.manager`: the paged manager: page tables of sequences,
  prefix-cache lookup, fork with copy-on-write, swap, accounting.
* :mod:`kvpage.kv.contiguous`: the pre-paging baseline, one contiguous
  reservation per sequence, behind the same interface.
* :mod:`kvpage.kv.factory`: the manager for a layout.
* :mod:`kvpage.kv.swap`: host pages for swapped-out sequences.
* :mod:`kvpage.kv.waste`: where the memory goes, by kind of waste.
"""

from kvpage.kv.contiguous import ContiguousKVCacheManager
from kvpage.kv.factory import make_kv_manager
from kvpage.kv.interface import Claim, KVManager, KVUsage, PageCopy
from kvpage.kv.manager import KVCacheManager, PageTable
from kvpage.kv.page_pool import Page, PagePool, PageState, PrefixHit
from kvpage.kv.prefix_hash import page_hash
from kvpage.kv.waste import KVWaste

__all__ = [
    "PageTable",
    "Claim",
    "ContiguousKVCacheManager",
    "KVCacheManager",
    "KVManager",
    "KVUsage",
    "KVWaste",
    "Page",
    "PageCopy",
    "PagePool",
    "PageState",
    "PrefixHit",
    "make_kv_manager",
    "page_hash",
]
