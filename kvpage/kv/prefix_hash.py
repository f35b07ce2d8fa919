"""Chained content hashes of full pages, the keys of the prefix cache.

Page *i* of a sequence is keyed by ``sha256(key(i-1) || token ids of page i)``,
so a key names the whole prefix up to the end of that page, not just the
page's own tokens: two requests share page *i* only if they agree on every
token before it. sha256 makes an accidental collision negligible; the pool
still compares the stored tokens on every hit.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = b"kvpage-prefix-root"


def page_hash(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of one full page given the key of the page before it."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


def page_hashes(parent_hash: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of consecutive full pages (``token_ids`` holds whole pages), each chained to the one before.

    The same keys as :func:`page_hash` page by page; the ids are packed
    once for all the pages, which halves the cost of a long run.
    """
    data = array("q", token_ids).tobytes()
    width = 8 * block_size  # bytes of a page's ids
    keys = []
    for start in range(0, len(data), width):
        parent_hash = hashlib.sha256(parent_hash + data[start : start + width]).digest()
        keys.append(parent_hash)
    return keys
