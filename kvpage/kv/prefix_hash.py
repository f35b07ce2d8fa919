"""Chained content hashes of full pages, the keys of the prefix cache.

Page *i* of a sequence is keyed by ``digest(key(i-1) || token ids of page i)``,
so a key names the whole prefix up to the end of that page, not just the
page's own tokens: two requests share page *i* only if they agree on every
token before it. The pool still compares the stored tokens on every hit.

Two digests, one chain (``prefix_caching_hash_algo``, as in vLLM):

* ``"sha256"``, the engine's default: an accidental collision is negligible,
  and a crafted prompt cannot aim at another request's pages.
* ``"builtin"``: Python's ``hash`` of (parent key, page), 64 bits, keyed by a
  secret drawn per process. About 3x cheaper a page; the odds of any
  collision in a replay of millions of pages are below one in ten million.
  The planner, which hashes tens of millions of pages and serves no one,
  uses it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

from kvpage.modes import PrefixHash

ROOT_HASH = b"kvpage-prefix-root"
ID_BYTES = 8  # a packed token id: int64


# Keys of consecutive full pages (each page's ids packed by pack), each chained to the one before.
ChainKeys = Callable[[bytes, Sequence[bytes]], list[bytes]]


def sha256_keys(parent_hash: bytes, pages: Sequence[bytes]) -> list[bytes]:
    """The ``"sha256"`` chain: each key is the digest of the parent key and the page."""
    keys = []
    sha256 = hashlib.sha256
    for page in pages:
        key = sha256(parent_hash)  # the digest of the concatenation, without copying the bytes
        key.update(page)
        parent_hash = key.digest()
        keys.append(parent_hash)
    return keys


def builtin_keys(parent_hash: bytes, pages: Sequence[bytes]) -> list[bytes]:
    """The ``"builtin"`` chain: each key is Python's hash of (parent key, page), as 8 bytes."""
    keys = []
    for page in pages:
        parent_hash = hash((parent_hash, page)).to_bytes(8, "little", signed=True)
        keys.append(parent_hash)
    return keys


def chain_keys(algo: PrefixHash) -> ChainKeys:
    """The chain of ``algo``."""
    return builtin_keys if algo == "builtin" else sha256_keys


def page_hash(parent_hash: bytes, page: bytes) -> bytes:
    """The ``"sha256"`` key of one full page (its ids packed by :func:`pack`) given the key of the page before it."""
    return sha256_keys(parent_hash, (page,))[0]


def pack(token_ids: Sequence[int]) -> bytes:
    """Token ids as the bytes that keys hash and pages keep: 8 per id (int64, the machine's byte order).

    struct, not array: array converts item by item through argument parsing, at twice the cost.
    """
    return struct.pack(f"{len(token_ids)}q", *token_ids)


def unpack(packed: bytes) -> tuple[int, ...]:
    """The token ids of :func:`pack`'s bytes."""
    return struct.unpack(f"{len(packed) // ID_BYTES}q", packed)


def split(packed: bytes, block_size: int) -> list[bytes]:
    """The pages of ``packed`` (whole pages of ids, by :func:`pack`), each its own bytes."""
    width = ID_BYTES * block_size
    return [packed[start : start + width] for start in range(0, len(packed), width)]
