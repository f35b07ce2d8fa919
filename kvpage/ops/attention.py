"""Pure-torch reference implementation of paged attention.

The KV cache of one layer is two tensors, ``key_cache`` and ``value_cache``,
each shaped ``[num_pages, block_size, num_kv_heads, head_dim]``.  A sequence
does not own a contiguous region of that tensor; it owns a list of *pages*
(its block table), and token ``p`` of the sequence lives in page
``block_table[p // block_size]`` at offset ``p % block_size``.  Flattening
the first two cache dimensions gives a *slot* number
``page * block_size + offset`` for every token.

One engine step processes a batch of sequences whose new tokens are
concatenated into a single ``[T, ...]`` tensor (see :class:`AttentionMetadata`).
For every sequence the step first writes the new tokens' K/V into their slots
(:func:`write_kv_cache`) and then lets each new token attend causally to every
earlier token of its sequence, old and new alike, by reading the cache through
the block table (:func:`paged_attention`).  This one rule covers prefill from
an empty cache, prefill over a cached (shared) prefix, chunked prefill, and
decode, so all of them can share a batch.

This module is the numerical specification that optimized kernels must match:
scores and softmax are computed in float32 and the result is cast back to the
query dtype.  Cache contents outside a sequence's valid range (padding pages,
unwritten tail of the last page) may hold anything, including NaN, and never
influence the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

__all__ = [
    "AttentionMetadata",
    "PrefillSegment",
    "StepMasks",
    "copy_pages",
    "paged_attention",
    "write_kv_cache",
]


class PrefillSegment(NamedTuple):
    """A sequence with more than one new token in this step."""

    sequence_index: int
    token_start: int
    query_len: int
    seq_len: int


class StepMasks(NamedTuple):
    """Which keys each new token must not see (True = hidden), per batch part."""

    decode_hidden: torch.Tensor  # [num_decode, L]
    prefill_hidden: tuple[torch.Tensor, ...]  # [query_len, seq_len] per prefill segment
    # [seq_len] keys no query of the segment sees (None when there are none)
    prefill_unused_keys: tuple[torch.Tensor | None, ...]


@dataclass
class AttentionMetadata:
    """One step's batch: S sequences whose new tokens are flattened in sequence order.

    ``T = sum(query_lens)``.  New token ``j`` of sequence ``i`` is at position
    ``seq_lens[i] - query_lens[i] + j`` and attends to positions ``0..`` that
    position.  Use :meth:`build` to derive ``block_tables`` and
    ``slot_mapping`` from per-sequence page lists.
    """

    query_lens: list[int]
    seq_lens: list[int]
    block_tables: torch.Tensor  # [S, max_pages] int32; entries past a sequence's pages are padding
    slot_mapping: torch.Tensor  # [T] int64; -1 means "do not write"
    block_size: int

    # Derived once per step so that every layer reuses them.
    num_tokens: int = field(init=False, repr=False, compare=False)
    all_decode: bool = field(init=False, repr=False, compare=False)
    decode_token_rows: torch.Tensor = field(init=False, repr=False, compare=False)
    decode_block_tables: torch.Tensor = field(init=False, repr=False, compare=False)
    decode_seq_lens: torch.Tensor = field(init=False, repr=False, compare=False)
    prefill_segments: tuple[PrefillSegment, ...] = field(init=False, repr=False, compare=False)
    prefill_pages: tuple[torch.Tensor, ...] = field(init=False, repr=False, compare=False)
    _masks_by_window: dict[int | None, StepMasks] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        device = self.block_tables.device
        self.num_tokens = sum(self.query_lens)

        decode_rows: list[int] = []
        decode_seqs: list[int] = []
        segments: list[PrefillSegment] = []
        token_start = 0
        for index, (query_len, seq_len) in enumerate(zip(self.query_lens, self.seq_lens)):
            if query_len == 1:
                decode_rows.append(token_start)
                decode_seqs.append(index)
            else:
                segments.append(PrefillSegment(index, token_start, query_len, seq_len))
            token_start += query_len
        self.prefill_segments = tuple(segments)
        self.all_decode = not segments
        self.prefill_pages = tuple(
            self.block_tables[seg.sequence_index, : math.ceil(seg.seq_len / self.block_size)].long()
            for seg in segments
        )
        self._masks_by_window = {}

        # Decode tokens are batched into one gather, so only read as many pages
        # as the longest decoding sequence needs.
        max_decode_len = max((self.seq_lens[i] for i in decode_seqs), default=0)
        decode_pages = math.ceil(max_decode_len / self.block_size)
        self.decode_token_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        # index_select, not fancy indexing: with a Python index list, torch's CPU
        # advanced-indexing path was measured at ~12 ms for 256 rows on 2 busy cores.
        if self.all_decode:
            decode_tables = self.block_tables
        else:
            decode_tables = self.block_tables.index_select(0, torch.tensor(decode_seqs, dtype=torch.long, device=device))
        self.decode_block_tables = decode_tables[:, :decode_pages].long()
        self.decode_seq_lens = torch.tensor([self.seq_lens[i] for i in decode_seqs], device=device)

    def _validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        num_seqs = len(self.query_lens)
        if len(self.seq_lens) != num_seqs:
            raise ValueError(
                f"seq_lens has {len(self.seq_lens)} entries but query_lens has {num_seqs}; "
                "they must describe the same sequences"
            )
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != num_seqs:
            raise ValueError(
                f"block_tables must have shape [num_seqs={num_seqs}, max_pages], "
                f"got {tuple(self.block_tables.shape)}"
            )
        max_tokens = self.block_tables.shape[1] * self.block_size
        for index, (query_len, seq_len) in enumerate(zip(self.query_lens, self.seq_lens)):
            if not 1 <= query_len <= seq_len:
                raise ValueError(
                    f"query_lens[{index}]={query_len} must satisfy 1 <= query_len <= "
                    f"seq_lens[{index}]={seq_len}"
                )
            if seq_len > max_tokens:
                raise ValueError(
                    f"seq_lens[{index}]={seq_len} exceeds the block table capacity "
                    f"{self.block_tables.shape[1]} pages * block_size {self.block_size}"
                )
        expected_tokens = sum(self.query_lens)
        if self.slot_mapping.shape != (expected_tokens,):
            raise ValueError(
                f"slot_mapping must have shape [sum(query_lens)={expected_tokens}], "
                f"got {tuple(self.slot_mapping.shape)}"
            )

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        page_lists: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build metadata from each sequence's list of physical pages.

        ``page_lists[i]`` must cover at least ``seq_lens[i]`` tokens.  Every
        new token gets a write slot (no ``-1`` padding).
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not len(query_lens) == len(seq_lens) == len(page_lists):
            raise ValueError(
                f"query_lens ({len(query_lens)}), seq_lens ({len(seq_lens)}) and "
                f"page_lists ({len(page_lists)}) must have the same length"
            )
        max_pages = max((len(pages) for pages in page_lists), default=0)
        padded_tables = [list(pages) + [0] * (max_pages - len(pages)) for pages in page_lists]
        slots: list[int] = []
        for index, (query_len, seq_len, pages) in enumerate(zip(query_lens, seq_lens, page_lists)):
            if seq_len > len(pages) * block_size:
                raise ValueError(
                    f"page_lists[{index}] has {len(pages)} pages of {block_size} tokens, "
                    f"too few for seq_lens[{index}]={seq_len}"
                )
            for position in range(seq_len - query_len, seq_len):
                slots.append(pages[position // block_size] * block_size + position % block_size)
        return cls(
            query_lens=list(query_lens),
            seq_lens=list(seq_lens),
            block_tables=torch.tensor(padded_tables, dtype=torch.int32, device=device).view(-1, max_pages),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_size=block_size,
        )

    def masks(self, sliding_window: int | None) -> StepMasks:
        """Attention masks of this step, built on first use and shared by all layers."""
        cached = self._masks_by_window.get(sliding_window)
        if cached is None:
            cached = self._build_masks(sliding_window)
            self._masks_by_window[sliding_window] = cached
        return cached

    def _build_masks(self, sliding_window: int | None) -> StepMasks:
        device = self.block_tables.device
        decode_keys = torch.arange(self.decode_block_tables.shape[1] * self.block_size, device=device)
        seq_lens = self.decode_seq_lens[:, None]
        decode_hidden = decode_keys[None, :] >= seq_lens
        if sliding_window is not None:
            decode_hidden |= decode_keys[None, :] < seq_lens - sliding_window
        prefill_hidden = []
        for segment in self.prefill_segments:
            first_position = segment.seq_len - segment.query_len
            query_positions = torch.arange(first_position, segment.seq_len, device=device)[:, None]
            key_positions = torch.arange(segment.seq_len, device=device)[None, :]
            hidden = key_positions > query_positions
            if sliding_window is not None:
                hidden |= key_positions <= query_positions - sliding_window
            prefill_hidden.append(hidden)
        # Without a window the last new token sees every key, so no key is unused.
        prefill_unused = tuple(h.all(dim=0) if sliding_window is not None else None for h in prefill_hidden)
        return StepMasks(decode_hidden, tuple(prefill_hidden), prefill_unused)

    def positions(self) -> torch.Tensor:
        """Position of every new token, ``[T]`` int64, on the block tables' device."""
        positions: list[int] = []
        for query_len, seq_len in zip(self.query_lens, self.seq_lens):
            positions.extend(range(seq_len - query_len, seq_len))
        return torch.tensor(positions, dtype=torch.long, device=self.block_tables.device)


def _check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
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


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new tokens' K/V (``[T, num_kv_heads, head_dim]``) into their slots, in place.

    Slots equal to -1 are skipped.
    """
    _check_cache_pair(key_cache, value_cache)
    _, _, num_kv_heads, head_dim = key_cache.shape
    expected = (slot_mapping.shape[0], num_kv_heads, head_dim)
    if key.shape != expected or value.shape != expected:
        raise ValueError(
            f"key and value must have shape {expected} to match slot_mapping and the cache, "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    writes = slot_mapping >= 0
    slots = slot_mapping[writes]
    flat_keys[slots] = key[writes].to(key_cache.dtype)
    flat_values[slots] = value[writes].to(value_cache.dtype)


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


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Read pages ``[..., P]`` of a cache into a new ``[..., P * block_size, Hkv, D]`` tensor."""
    return cache[pages].flatten(-4, -3)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's cached K/V.

    ``query`` is ``[T, num_q_heads, head_dim]``; the K/V of the new tokens must
    already be in the cache.  Query head ``h`` reads KV head
    ``h // (num_q_heads // num_kv_heads)``.  With ``sliding_window=W`` a token
    at position ``p`` only sees positions ``> p - W``.  Returns a tensor shaped
    and typed like ``query``.
    """
    _check_cache_pair(key_cache, value_cache)
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
    masks = meta.masks(sliding_window)

    if meta.all_decode:
        return _decode_attention(query, key_cache, value_cache, meta, masks, scale).to(query.dtype)
    output = torch.empty_like(query)
    if meta.decode_token_rows.numel() > 0:
        decode_query = query.index_select(0, meta.decode_token_rows)
        decode_out = _decode_attention(decode_query, key_cache, value_cache, meta, masks, scale)
        output.index_copy_(0, meta.decode_token_rows, decode_out.to(query.dtype))
    for segment, pages, hidden, unused_keys in zip(
        meta.prefill_segments, meta.prefill_pages, masks.prefill_hidden, masks.prefill_unused_keys
    ):
        keys = _gather_pages(key_cache, pages)[: segment.seq_len]
        values = _gather_pages(value_cache, pages)[: segment.seq_len]
        if unused_keys is not None:
            values.masked_fill_(unused_keys[:, None, None], 0.0)
        rows = slice(segment.token_start, segment.token_start + segment.query_len)
        segment_out = _masked_attention(query[rows][None], keys[None], values[None], hidden[None], scale)
        output[rows] = segment_out[0]
    return output


def _decode_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    meta: AttentionMetadata, masks: StepMasks, scale: float,
) -> torch.Tensor:
    """All single-token sequences at once: one gather, padded to the longest of them."""
    keys = _gather_pages(key_cache, meta.decode_block_tables)  # [D, L, Hkv, Dh]
    values = _gather_pages(value_cache, meta.decode_block_tables)
    # Padding pages and unwritten slots may hold NaN; 0 probability * NaN is NaN.
    values.masked_fill_(masks.decode_hidden[:, :, None, None], 0.0)
    output = _masked_attention(query[:, None], keys, values, masks.decode_hidden[:, None, :], scale)
    return output[:, 0]


def copy_pages(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]) -> None:
    """Copy whole pages ``src -> dst`` in every layer's K and V cache (copy-on-write).

    All sources are read before any destination is written.
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
        _check_cache_pair(key_cache, value_cache)
        key_cache[destinations] = key_cache[sources]
        value_cache[destinations] = value_cache[sources]
