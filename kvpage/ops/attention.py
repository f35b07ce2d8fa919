"""Pure-torch reference implementation of paged attention.

The KV cache of one layer is two tensors, ``key_cache`` and ``value_cache``,
each shaped ``[num_pages, block_size, num_kv_heads, head_dim]``.  A sequence
does not own a contiguous region of that tensor; it owns a list of *pages*
(its page table), and token ``p`` of the sequence lives in page
``page_table[p // block_size]`` at offset ``p % block_size``.  Flattening
the first two cache dimensions gives a *slot* number
``page * block_size + offset`` for every token.

One engine step processes a batch of sequences whose new tokens are
concatenated into a single ``[T, ...]`` tensor (see :class:`AttentionMetadata`).
For every sequence the step first writes the new tokens' K/V into their slots
(:func:`write_kv_cache`) and then lets each new token attend causally to every
earlier token of its sequence, old and new alike, by reading the cache through
the page table (:func:`paged_attention`).  This one rule covers prefill from
an empty cache, prefill over a cached (shared) prefix, chunked prefill, and
decode, so all of them can share a batch.

This module is the numerical specification that the fast paths must match
(:mod:`kvpage.ops.sdpa_attention` on CPU, the Triton kernels on CUDA), and it
dispatches to them by the metadata's backend. Here scores and softmax are
computed in float32 and the result is cast back to the query dtype. Cache
contents outside a sequence's valid range (padding pages, unwritten tail of
the last page) may hold anything, including NaN, and never influence the
output.
"""

from __future__ import annotations

import torch

from kvpage.ops import sdpa_attention
from kvpage.ops.fp8 import CacheScales, as_bytes, dequantize, is_fp8, quantize
from kvpage.ops.metadata import AttentionMetadata, StepMasks, resolve_backend, wants_kernels

__all__ = ["copy_pages", "paged_attention", "write_kv_cache"]


def _check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor, scales: CacheScales | None = None) -> None:
    if key_cache.dim() != 4:
        raise ValueError(
            "key_cache must have shape [num_pages, block_size, num_kv_heads, head_dim], "
            f"got {tuple(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape "
            f"{tuple(key_cache.shape)}"
        )
    if is_fp8(key_cache.dtype) != (scales is not None):
        raise ValueError(f"scales must be given exactly when the cache is 8-bit: the cache is {key_cache.dtype}, "
                         f"scales {'given' if scales is not None else 'missing'}")
    if scales is not None and (scales.key.shape != key_cache.shape[:3] or scales.value.shape != key_cache.shape[:3]):
        raise ValueError(f"scales must have shape {tuple(key_cache.shape[:3])} (pages, slots, kv heads), got "
                         f"{tuple(scales.key.shape)} and {tuple(scales.value.shape)}")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str = "auto",
    scales: CacheScales | None = None,
) -> None:
    """Store new tokens' K/V (``[T, num_kv_heads, head_dim]``) into their slots, in place.

    Slots equal to -1 are skipped. ``backend`` is as in :class:`AttentionMetadata`.
    An 8-bit cache stores quantized values and their scale bytes into ``scales``.
    """
    _check_cache_pair(key_cache, value_cache, scales)
    _, _, num_kv_heads, head_dim = key_cache.shape
    expected = (slot_mapping.shape[0], num_kv_heads, head_dim)
    if key.shape != expected or value.shape != expected:
        raise ValueError(
            f"key and value must have shape {expected} to match slot_mapping and the cache, "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if wants_kernels(backend, key_cache):
        from kvpage.ops import triton_cache

        triton_cache.write_kv_cache(key, value, key_cache, value_cache, slot_mapping, scales)
        return
    # Only padding rows (CUDA graphs) have slot -1; without them the write is one plain row copy.
    if bool((slot_mapping < 0).any()):
        writes = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[writes], key[writes], value[writes]
    for new, cache, scale in ((key, key_cache, None if scales is None else scales.key),
                              (value, value_cache, None if scales is None else scales.value)):
        if scale is None:
            cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, new.to(cache.dtype))
        else:
            values, exponents = quantize(new, cache.dtype)
            as_bytes(cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, as_bytes(values))
            scale.view(-1, num_kv_heads).index_copy_(0, slot_mapping, exponents)


def _masked_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor, scale: float
) -> torch.Tensor:
    """Grouped-query attention over gathered keys, all in float32.

    query ``[B, Q, Hq, D]``; keys/values ``[B, L, Hkv, D]`` (values must be
    finite wherever some query looks); hidden ``[B, Q, L]`` bool, True where a
    query must not look.  Returns ``[B, Q, Hq, D]`` float32.
    """
    batch, num_queries, num_q_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    group = num_q_heads // num_kv_heads
    # [B, Hkv, group*Q, D]: query heads sharing one KV head become extra rows,
    # so a single matmul per KV head covers the whole group.
    grouped_query = (
        query.view(batch, num_queries, num_kv_heads, group, head_dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(batch, num_kv_heads, group * num_queries, head_dim)
        .float()
    )
    keys_t = keys.float().permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    values_t = values.float().permute(0, 2, 1, 3)  # [B, Hkv, L, D]

    scores = torch.matmul(grouped_query * scale, keys_t)  # [B, Hkv, group*Q, L]
    # masked_fill also overwrites NaN scores of keys that hold garbage.
    scores.view(batch, num_kv_heads, group, num_queries, -1).masked_fill_(
        hidden[:, None, None, :, :], float("-inf")
    )
    probs = torch.softmax(scores, dim=-1)
    output = torch.matmul(probs, values_t)  # [B, Hkv, group*Q, D]
    return (
        output.view(batch, num_kv_heads, group, num_queries, head_dim)
        .permute(0, 3, 1, 2, 4)
        .reshape(batch, num_queries, num_q_heads, head_dim)
    )


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Read pages ``[..., P]`` of a cache into a new ``[..., P * block_size, Hkv, D]`` tensor
    (float32, dequantized, when the cache is 8-bit and ``scale`` holds its scale bytes)."""
    if scale is None:
        return cache[pages].flatten(-4, -3)
    values = as_bytes(cache)[pages].view(cache.dtype).flatten(-4, -3)
    return dequantize(values, scale[pages].flatten(-3, -2))


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    scales: CacheScales | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's cached K/V.

    ``query`` is ``[T, num_q_heads, head_dim]``; the K/V of the new tokens must
    already be in the cache.  Query head ``h`` reads KV head
    ``h // (num_q_heads // num_kv_heads)``.  With ``sliding_window=W`` a token
    at position ``p`` only sees positions ``> p - W``.  Returns a tensor shaped
    and typed like ``query``. ``scales`` are an 8-bit cache's scale bytes.
    """
    _check_cache_pair(key_cache, value_cache, scales)
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if num_tokens != meta.num_tokens:
        raise ValueError(f"query has {num_tokens} tokens but meta describes sum(query_lens)={meta.num_tokens}")
    if cache_head_dim != head_dim or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"query [T, {num_q_heads}, {head_dim}] is incompatible with a cache of "
            f"{num_kv_heads} kv heads of dim {cache_head_dim}: head_dim must match and "
            "num_q_heads must be a multiple of num_kv_heads"
        )
    if block_size != meta.block_size:
        raise ValueError(f"cache block_size {block_size} != meta.block_size {meta.block_size}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    path = resolve_backend(meta.backend, query.device)
    if path == "triton":
        from kvpage.ops import triton_attention  # Triton is needed only where the kernels run

        return triton_attention.paged_attention(query, key_cache, value_cache, meta, scale, sliding_window,
                                                scales=scales)
    if path == "sdpa":
        return sdpa_attention.paged_attention(query, key_cache, value_cache, meta, scale, sliding_window, scales)
    masks = meta.masks(sliding_window)
    work = meta.reference
    if meta.all_decode:
        return _decode_attention(query, key_cache, value_cache, meta, masks, scale, scales).to(query.dtype)
    output = torch.empty_like(query)
    if work.decode_token_rows.numel() > 0:
        decode_query = query.index_select(0, work.decode_token_rows)
        decode_out = _decode_attention(decode_query, key_cache, value_cache, meta, masks, scale, scales)
        output.index_copy_(0, work.decode_token_rows, decode_out.to(query.dtype))
    for segment, pages, hidden, unused_keys in zip(
        meta.prefill_segments, work.prefill_pages, masks.prefill_hidden, masks.prefill_unused_keys
    ):
        keys = _gather_pages(key_cache, pages, None if scales is None else scales.key)[: segment.seq_len]
        values = _gather_pages(value_cache, pages, None if scales is None else scales.value)[: segment.seq_len]
        if unused_keys is not None:
            values.masked_fill_(unused_keys[:, None, None], 0.0)
        rows = slice(segment.token_start, segment.token_start + segment.query_len)
        segment_out = _masked_attention(query[rows][None], keys[None], values[None], hidden[None], scale)
        output[rows] = segment_out[0]
    return output


def _decode_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    meta: AttentionMetadata, masks: StepMasks, scale: float, scales: CacheScales | None,
) -> torch.Tensor:
    """All single-token sequences at once: one gather, padded to the longest of them."""
    tables = meta.reference.decode_page_tables
    keys = _gather_pages(key_cache, tables, None if scales is None else scales.key)  # [D, L, Hkv, Dh]
    values = _gather_pages(value_cache, tables, None if scales is None else scales.value)
    # Padding pages and unwritten slots may hold NaN; 0 probability * NaN is NaN.
    values.masked_fill_(masks.decode_hidden[:, :, None, None], 0.0)
    output = _masked_attention(query[:, None], keys, values, masks.decode_hidden[:, None, :], scale)
    return output[:, 0]


def copy_pages(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]) -> None:
    """Copy whole pages ``src -> dst`` in every layer's K and V cache (copy-on-write).

    All sources are read before any destination is written. Any pair of tensors indexed by page first
    will do: an 8-bit cache's scale bytes move the same way as its values.
    """
    if not copies or not kv_caches:
        return
    num_pages = kv_caches[0][0].shape[0]
    for src, dst in copies:
        if not (0 <= src < num_pages and 0 <= dst < num_pages):
            raise ValueError(f"copy ({src} -> {dst}) has a page id outside [0, {num_pages}) in copies")
    device = kv_caches[0][0].device
    sources = torch.tensor([src for src, _ in copies], dtype=torch.long, device=device)
    destinations = torch.tensor([dst for _, dst in copies], dtype=torch.long, device=device)
    for key_cache, value_cache in kv_caches:
        if key_cache.shape != value_cache.shape:
            raise ValueError(f"key and value caches differ in shape: {tuple(key_cache.shape)} and "
                             f"{tuple(value_cache.shape)}")
        for cache in (as_bytes(key_cache), as_bytes(value_cache)):
            cache[destinations] = cache[sources]
