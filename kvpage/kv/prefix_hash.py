"""Chained content hashes of full pages, the keys of the prefix cache.

Page *i* of a sequence is keyed by ``sha256(key(i-1) || token ids of page i)``,
so a key names the whole prefix up to the end of that page, not just the
page's own tokens: two requests share page *i* only if they agree on every
token before it. sha256 makes an accidental collision negligible; the pool
still compares the stored tokens on every hit.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = b"kvpage-prefix-root"
ID_BYTES = 8  # a packed token id: int64


def page_hash(parent_hash: bytes, page: bytes) -> bytes:
    """Key of one full page (its ids packed by :func:`pack`) given the key of the page before it."""
    return hashlib.sha256(parent_hash + page).digest()


def pack(token_ids: Sequence[int]) -> bytes:
    """Token ids as the bytes that keys hash and pages keep: 8 per id (int64, the machine's byte order).

    struct, not array: array converts item by item through argument parsing, at twice the cost.
    """
    return struct.pack(f"{len(token_ids)}q", *token_ids)


def unpack(packed: bytes) -> tuple[int, ...]:
    """The token ids of :func:`pack`'s bytes."""
    return struct.unpack(f"{len(packed) // ID_BYTES}q", packed)


def page_hashes(parent_hash: bytes, packed: bytes, block_size: int) -> list[bytes]:
    """Keys of consecutive full pages (``packed``, by :func:`pack`, holds whole pages), each chained to the last.

    The same keys as :func:`page_hash` page by page, hashing each page's
    bytes in place (a memoryview) rather than a copy joined to the parent key.
    """
    data = memoryview(packed)
    width = ID_BYTES * block_size  # bytes of a page's ids
    keys = []
    sha256 = hashlib.sha256
    for start in range(0, len(data), width):
        key = sha256(parent_hash)  # the same digest as of the concatenation, without copying the bytes
        key.update(data[start : start + width])
        parent_hash = key.digest()
        keys.append(parent_hash)
    return keys
