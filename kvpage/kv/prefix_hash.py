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


def full_page_hashes(token_ids: Sequence[int], block_size: int, max_pages: int | None = None) -> list[bytes]:
    """Keys of the full pages at the start of ``token_ids`` (at most ``max_pages`` of them)."""
    num_full = len(token_ids) // block_size
    if max_pages is not None:
        num_full = min(num_full, max_pages)
    keys: list[bytes] = []
    parent = ROOT_HASH
    for i in range(num_full):
        parent = page_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        keys.append(parent)
    return keys
