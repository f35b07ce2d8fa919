"""Fast paged attention through torch's ``scaled_dot_product_attention`` (the CPU path).

The reference (:mod:`kvpage.ops.attention`) gathers whole pages and hides
what a query must not see with dense masks, upcasting everything to
float32. That is easy to check and slow. This path reads the same cache
and must give the same result (float32: within 1e-5 relative), but does
less work per step:

* **It gathers tokens, not pages.** Once per step (shared by every layer)
  it turns the page tables into *key slots*: the flat cache slot of every
  key a sequence's queries look at, nothing past the sequence's end and
  nothing before a sliding window's start. Garbage slots (an unwritten page
  tail, NaN) are never read, so no value masking is needed.
* **Decode rows go in length buckets.** Single-token sequences are padded
  only to the longest member of their bucket (key counts rounded up to a
  power of two, at least :data:`MIN_BUCKET`), not to the longest of the
  step, and the pad re-reads the sequence's last key, which the mask hides.
  Each bucket is one SDPA call whose query rows are the GQA group of a KV
  head (``[n, Hkv, group, D]``), so no KV head is repeated in memory.
* **Prefill uses SDPA's causal mode** when a segment's queries are its whole
  context (no cached prefix, no window cutting in), which needs no mask at
  all; a segment over a cached prefix or under a sliding window gets one
  boolean ``[query_len, keys]`` mask.

An 8-bit cache's keys and values are dequantized as they are gathered
(only the slots a query looks at), to the query's dtype.

Scores and softmax run in SDPA's kernels (float32 accumulation for 16-bit
inputs), so in bfloat16 the result can differ from the reference in the
last bits, as two float32 softmax implementations can in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvpage.ops.fp8 import CacheScales, as_bytes, dequantize
from kvpage.ops.metadata import AttentionMetadata

__all__ = ["MIN_BUCKET", "SdpaWork", "paged_attention"]

# Decode sequences with at most this many keys share one bucket; above it, buckets double. Each bucket
# costs a handful of calls per layer, which short contexts do not repay (SmolLM2, 12 chats: 64 was slower).
MIN_BUCKET = 256


class DecodeBucket(NamedTuple):
    """Decode rows padded to one key count: ``slots [n, keys]``, ``visible [n, 1, 1, keys]`` (True: attend)."""

    rows: torch.Tensor  # [n] rows of the step's query tensor
    slots: torch.Tensor  # [n * keys] flat cache slots, row-major
    visible: torch.Tensor
    keys: int
    whole: bool  # the rows are all of the step's rows, in order: no gather or scatter of queries needed


class PrefillPart(NamedTuple):
    """One prefill segment: its query rows, its key slots, and its mask (None: SDPA's causal mode)."""

    rows: slice
    slots: torch.Tensor  # [keys]
    visible: torch.Tensor | None  # [query_len, keys] bool, True where a query attends


@dataclass
class SdpaWork:
    """This path's per-step index tensors, built once per sliding window and shared by every layer."""

    meta: AttentionMetadata
    _by_window: dict[int | None, tuple[list[DecodeBucket], list[PrefillPart]]] = field(default_factory=dict)

    def parts(self, window: int | None) -> tuple[list[DecodeBucket], list[PrefillPart]]:
        cached = self._by_window.get(window)
        if cached is None:
            cached = (self._decode_buckets(window), self._prefill_parts(window))
            self._by_window[window] = cached
        return cached

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache slots of ``positions [n, k]`` through page tables ``[n, pages]``."""
        block_size = self.meta.block_size
        pages = torch.gather(tables, 1, torch.div(positions, block_size, rounding_mode="floor"))
        return pages * block_size + positions % block_size

    def _decode_buckets(self, window: int | None) -> list[DecodeBucket]:
        meta = self.meta
        device = meta.page_tables.device
        by_bucket: dict[int, list[int]] = {}
        for sequence in meta.decode_seqs:
            keys = meta.seq_lens[sequence] if window is None else min(window, meta.seq_lens[sequence])
            bucket = MIN_BUCKET if keys <= MIN_BUCKET else 1 << math.ceil(math.log2(keys))
            by_bucket.setdefault(bucket, []).append(sequence)
        starts = meta.token_starts
        buckets = []
        for members in by_bucket.values():
            seq_lens = [meta.seq_lens[i] for i in members]
            first = [0 if window is None else max(0, n - window) for n in seq_lens]
            keys = max(n - f for n, f in zip(seq_lens, first))
            member_index = torch.tensor(members, dtype=torch.long, device=device)
            last = torch.tensor(seq_lens, dtype=torch.long, device=device)[:, None] - 1
            offsets = torch.arange(keys, device=device)[None, :]
            positions = torch.tensor(first, dtype=torch.long, device=device)[:, None] + offsets
            visible = positions <= last
            # Padding re-reads the last key (always written), so no NaN enters the product.
            slots = self._slots(meta.page_tables.index_select(0, member_index).long(), torch.minimum(positions, last))
            rows = torch.tensor([starts[i] for i in members], dtype=torch.long, device=device)
            whole = meta.all_decode and len(members) == len(meta.query_lens)
            buckets.append(DecodeBucket(rows, slots.view(-1), visible[:, None, None, :], keys, whole))
        return buckets

    def _prefill_parts(self, window: int | None) -> list[PrefillPart]:
        meta = self.meta
        device = meta.page_tables.device
        parts = []
        for segment in meta.prefill_segments:
            first_query = segment.seq_len - segment.query_len
            first_key = 0 if window is None else max(0, first_query - window + 1)
            key_positions = torch.arange(first_key, segment.seq_len, device=device)
            table = meta.page_tables[segment.sequence_index].long()[None]
            slots = self._slots(table, key_positions[None])[0]
            visible = None
            if first_query > 0 or (window is not None and window < segment.seq_len):
                query_positions = torch.arange(first_query, segment.seq_len, device=device)[:, None]
                visible = key_positions[None, :] <= query_positions
                if window is not None:
                    visible &= key_positions[None, :] > query_positions - window
            rows = slice(segment.token_start, segment.token_start + segment.query_len)
            parts.append(PrefillPart(rows, slots, visible))
        return parts


class SlotReader:
    """Gathers cache rows ``[n, Hkv, D]`` by flat slot, dequantizing an 8-bit cache to ``dtype``."""

    def __init__(self, cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        num_kv_heads, head_dim = cache.shape[2:]
        self.flat = as_bytes(cache).view(-1, num_kv_heads, head_dim)
        self.cache_dtype, self.dtype = cache.dtype, dtype
        self.flat_scale = None if scale is None else scale.view(-1, num_kv_heads)

    def __call__(self, slots: torch.Tensor) -> torch.Tensor:
        rows = self.flat.index_select(0, slots)
        if self.flat_scale is None:
            return rows
        return dequantize(rows.view(self.cache_dtype), self.flat_scale.index_select(0, slots)).to(self.dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None,
                    scales: CacheScales | None = None) -> torch.Tensor:
    """:func:`kvpage.ops.attention.paged_attention` (arguments already checked there) through SDPA."""
    num_q_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    read_keys = SlotReader(key_cache, None if scales is None else scales.key, query.dtype)
    read_values = SlotReader(value_cache, None if scales is None else scales.value, query.dtype)
    buckets, prefills = meta.sdpa.parts(sliding_window)
    output = torch.empty_like(query)
    for bucket in buckets:
        count = bucket.rows.shape[0]
        # [n, keys, Hkv, D] viewed as [n, Hkv, keys, D]; SDPA takes the strides as they are.
        keys = read_keys(bucket.slots).view(count, bucket.keys, num_kv_heads, head_dim).transpose(1, 2)
        values = read_values(bucket.slots).view(count, bucket.keys, num_kv_heads, head_dim).transpose(1, 2)
        # Query head h reads KV head h // group: the group's heads are query rows of that KV head.
        rows = query if bucket.whole else query.index_select(0, bucket.rows)
        grouped = rows.view(count, num_kv_heads, group, head_dim)
        attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bucket.visible, scale=scale)
        if bucket.whole:
            return attended.reshape(count, num_q_heads, head_dim)
        output.index_copy_(0, bucket.rows, attended.reshape(count, num_q_heads, head_dim))
    for part in prefills:
        keys = read_keys(part.slots).transpose(0, 1)[None]  # [1, Hkv, keys, D]
        values = read_values(part.slots).transpose(0, 1)[None]
        attended = F.scaled_dot_product_attention(query[part.rows].transpose(0, 1)[None], keys, values,
                                                  attn_mask=part.visible, is_causal=part.visible is None,
                                                  scale=scale, enable_gqa=group > 1)
        output[part.rows] = attended[0].transpose(0, 1)
    return output
