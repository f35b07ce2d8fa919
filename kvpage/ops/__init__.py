"""Attention operators over the paged KV cache.

``attention`` holds the pure-torch reference implementation; it defines the
numerics that any accelerated kernel must reproduce.
"""

from kvpage.ops.attention import (
    AttentionMetadata,
    PrefillSegment,
    copy_pages,
    paged_attention,
    write_kv_cache,
)

__all__ = [
    "AttentionMetadata",
    "PrefillSegment",
    "copy_pages",
    "paged_attention",
    "write_kv_cache",
]
