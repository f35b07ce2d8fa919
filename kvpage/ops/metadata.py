"""What one step's attention needs to know about its batch.

A step flattens the new tokens of S sequences into one ``[T, ...]`` tensor.
:class:`AttentionMetadata` says where each sequence's tokens sit in that
tensor, how long each sequence is, where its K/V pages are (page tables) and
which cache slot each new token's K/V goes to (slot mapping).

The two attention implementations read it differently, and each derives what
it needs only on first use, once per step, shared by every layer:

* the pure-torch reference (:mod:`kvpage.ops.attention`) gathers whole pages
  and masks them, so it wants per-part index tensors and boolean masks
  (:class:`ReferenceWork`);
* the Triton kernels (:mod:`kvpage.ops.triton_attention`) walk the block
  tables themselves, so they want a few int32 arrays: where each sequence's
  queries start, its length, which sequences decode, and how prefill queries
  are cut into tiles (:class:`KernelWork`). These travel to the GPU in one
  pinned, asynchronous copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import torch

from kvpage.config import ATTENTION_BACKENDS
from kvpage.modes import ATTENTION_PATHS, AttentionPath
from kvpage.ops.transfer import to_device_segments

if TYPE_CHECKING:
    from kvpage.ops.sdpa_attention import SdpaWork

__all__ = ["ATTENTION_BACKENDS", "AttentionMetadata", "KernelWork", "PrefillSegment", "ReferenceWork", "StepMasks",
           "resolve_backend", "wants_kernels"]

# Query tokens per prefill program; the tile table is cut to this size.
PREFILL_TILE = 64


def resolve_backend(backend: str, device: torch.device) -> AttentionPath:
    """The code that runs on ``device``: ``"auto"`` is the Triton kernels on CUDA, SDPA elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    if backend not in ATTENTION_PATHS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


def wants_kernels(backend: str, tensor: torch.Tensor) -> bool:
    """Whether to run the Triton kernels on ``tensor`` (else torch code: the SDPA path or the reference)."""
    return resolve_backend(backend, tensor.device) == "triton"


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
    position.  Use :meth:`build` to derive ``page_tables`` and
    ``slot_mapping`` from per-sequence page lists.
    """

    query_lens: list[int]
    seq_lens: list[int]
    page_tables: torch.Tensor  # [S, max_pages] int32; entries past a sequence's pages are padding
    slot_mapping: torch.Tensor  # [T] int64; -1 means "do not write"
    block_size: int
    backend: str = "auto"

    num_tokens: int = field(init=False, repr=False, compare=False)
    all_decode: bool = field(init=False, repr=False, compare=False)
    token_starts: list[int] = field(init=False, repr=False, compare=False)  # [S + 1]: sequence i's first row
    decode_seqs: list[int] = field(init=False, repr=False, compare=False)  # sequences with one new token
    prefill_segments: tuple[PrefillSegment, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        self.num_tokens = sum(self.query_lens)
        decode_seqs: list[int] = []
        segments: list[PrefillSegment] = []
        token_starts = [0]
        for index, (query_len, seq_len) in enumerate(zip(self.query_lens, self.seq_lens)):
            if query_len == 1:
                decode_seqs.append(index)
            else:
                segments.append(PrefillSegment(index, token_starts[-1], query_len, seq_len))
            token_starts.append(token_starts[-1] + query_len)
        self.token_starts = token_starts
        self.decode_seqs = decode_seqs
        self.prefill_segments = tuple(segments)
        self.all_decode = not segments

    def _validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.backend!r}")
        num_seqs = len(self.query_lens)
        if len(self.seq_lens) != num_seqs:
            raise ValueError(
                f"seq_lens has {len(self.seq_lens)} entries but query_lens has {num_seqs}; "
                "they must describe the same sequences"
            )
        if self.page_tables.dim() != 2 or self.page_tables.shape[0] != num_seqs:
            raise ValueError(
                f"page_tables must have shape [num_seqs={num_seqs}, max_pages], "
                f"got {tuple(self.page_tables.shape)}"
            )
        max_tokens = self.page_tables.shape[1] * self.block_size
        for index, (query_len, seq_len) in enumerate(zip(self.query_lens, self.seq_lens)):
            if not 1 <= query_len <= seq_len:
                raise ValueError(
                    f"query_lens[{index}]={query_len} must satisfy 1 <= query_len <= "
                    f"seq_lens[{index}]={seq_len}"
                )
            if seq_len > max_tokens:
                raise ValueError(
                    f"seq_lens[{index}]={seq_len} exceeds the page table capacity "
                    f"{self.page_tables.shape[1]} pages * block_size {self.block_size}"
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
        backend: str = "auto",
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
            page_tables=torch.tensor(padded_tables, dtype=torch.int32, device=device).view(-1, max_pages),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_size=block_size,
            backend=backend,
        )

    def uses_kernels(self, query: torch.Tensor) -> bool:
        """Whether this step's attention runs the Triton kernels (else the torch reference)."""
        return wants_kernels(self.backend, query)

    @cached_property
    def reference(self) -> ReferenceWork:
        return ReferenceWork.build(self)

    @cached_property
    def sdpa(self) -> SdpaWork:
        from kvpage.ops.sdpa_attention import SdpaWork  # it imports this module

        return SdpaWork(self)

    @cached_property
    def kernel(self) -> KernelWork:
        return KernelWork.build(self)

    def use_kernel_work(self, work: KernelWork) -> None:
        """Use these device arrays instead of building them (a CUDA graph's static buffers)."""
        self.__dict__["kernel"] = work  # where functools.cached_property keeps its value

    def masks(self, sliding_window: int | None) -> StepMasks:
        """The reference's attention masks, built on first use and shared by all layers."""
        return self.reference.masks(self, sliding_window)

    def positions(self) -> torch.Tensor:
        """Position of every new token, ``[T]`` int64, on the page tables' device."""
        positions: list[int] = []
        for query_len, seq_len in zip(self.query_lens, self.seq_lens):
            positions.extend(range(seq_len - query_len, seq_len))
        return torch.tensor(positions, dtype=torch.long, device=self.page_tables.device)


@dataclass
class ReferenceWork:
    """Index tensors of the torch reference: decode rows gathered at once, prefill one segment at a time."""

    decode_token_rows: torch.Tensor
    decode_page_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    prefill_pages: tuple[torch.Tensor, ...]
    _masks_by_window: dict[int | None, StepMasks] = field(default_factory=dict)

    @classmethod
    def build(cls, meta: AttentionMetadata) -> ReferenceWork:
        device = meta.page_tables.device
        starts = [0]
        for query_len in meta.query_lens:
            starts.append(starts[-1] + query_len)
        decode_seqs = meta.decode_seqs
        # Decode tokens are batched into one gather, so only read as many pages
        # as the longest decoding sequence needs.
        decode_pages = math.ceil(max((meta.seq_lens[i] for i in decode_seqs), default=0) / meta.block_size)
        # index_select, not fancy indexing: with a Python index list, torch's CPU
        # advanced-indexing path was measured at ~12 ms for 256 rows on 2 busy cores.
        if meta.all_decode:
            decode_tables = meta.page_tables
        else:
            decode_tables = meta.page_tables.index_select(0, torch.tensor(decode_seqs, dtype=torch.long,
                                                                           device=device))
        return cls(
            decode_token_rows=torch.tensor([starts[i] for i in decode_seqs], dtype=torch.long, device=device),
            decode_page_tables=decode_tables[:, :decode_pages].long(),
            decode_seq_lens=torch.tensor([meta.seq_lens[i] for i in decode_seqs], device=device),
            prefill_pages=tuple(
                meta.page_tables[seg.sequence_index, : math.ceil(seg.seq_len / meta.block_size)].long()
                for seg in meta.prefill_segments
            ),
        )

    def masks(self, meta: AttentionMetadata, sliding_window: int | None) -> StepMasks:
        cached = self._masks_by_window.get(sliding_window)
        if cached is None:
            cached = self._build_masks(meta, sliding_window)
            self._masks_by_window[sliding_window] = cached
        return cached

    def _build_masks(self, meta: AttentionMetadata, sliding_window: int | None) -> StepMasks:
        device = meta.page_tables.device
        decode_keys = torch.arange(self.decode_page_tables.shape[1] * meta.block_size, device=device)
        seq_lens = self.decode_seq_lens[:, None]
        decode_hidden = decode_keys[None, :] >= seq_lens
        if sliding_window is not None:
            decode_hidden |= decode_keys[None, :] < seq_lens - sliding_window
        prefill_hidden = []
        for segment in meta.prefill_segments:
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


@dataclass
class KernelWork:
    """The int32 arrays the Triton kernels index, all on the cache's device.

    ``prefill_tiles[k] = (sequence, first query of the tile)``: prefill
    programs each take :data:`PREFILL_TILE` queries of one sequence.
    """

    query_start: torch.Tensor  # [S + 1]: sequence i's new tokens are rows query_start[i]:query_start[i+1]
    seq_lens: torch.Tensor  # [S]
    decode_seqs: torch.Tensor  # [num_decode]
    prefill_tiles: torch.Tensor  # [num_prefill_tiles, 2]

    @property
    def num_decode(self) -> int:
        return self.decode_seqs.shape[0]

    @property
    def num_prefill_tiles(self) -> int:
        return self.prefill_tiles.shape[0]

    @classmethod
    def build(cls, meta: AttentionMetadata) -> KernelWork:
        query_start = [0]
        for query_len in meta.query_lens:
            query_start.append(query_start[-1] + query_len)
        tiles: list[int] = []
        for segment in meta.prefill_segments:
            for first in range(0, segment.query_len, PREFILL_TILE):
                tiles += (segment.sequence_index, first)
        # One asynchronous copy instead of four blocking ones.
        query_start_t, seq_lens, decode_seqs, tiles_t = to_device_segments(
            [query_start, meta.seq_lens, meta.decode_seqs, tiles], torch.int32, meta.page_tables.device)
        return cls(query_start=query_start_t, seq_lens=seq_lens, decode_seqs=decode_seqs,
                   prefill_tiles=tiles_t.view(-1, 2))
