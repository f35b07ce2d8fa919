"""Attention operators over the paged KV cache.

``attention`` holds the pure-torch reference implementation; it defines the
numerics that the fast paths must reproduce and dispatches to them by
backend: ``sdpa_attention`` (torch's scaled_dot_product_attention over
gathered key slots: what ``"auto"`` runs on a CPU) and the Triton kernels
(``triton_attention``, ``triton_cache``: a CUDA device, or
``backend="triton"``). ``fp8`` stores and reads 8-bit pages. ``metadata`` describes one step's batch to all three.
The Triton modules are imported only when used, so a CPU install needs no
Triton.
"""

from kvpage.ops.attention import copy_pages, paged_attention, write_kv_cache
from kvpage.ops.fp8 import CacheScales, LayerKV
from kvpage.ops.metadata import ATTENTION_BACKENDS, AttentionMetadata, PrefillSegment, wants_kernels

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMetadata",
    "CacheScales",
    "LayerKV",
    "PrefillSegment",
    "copy_pages",
    "paged_attention",
    "wants_kernels",
    "write_kv_cache",
]
