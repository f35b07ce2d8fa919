"""Triton attention kernels over the paged KV cache.

They compute what :mod:`kvpage.ops.attention` specifies (that module is the
reference they are tested against), reading K/V straight out of the pages
through the page tables instead of gathering them first.

**Decode** (one new token per sequence) is bound by memory bandwidth: every
step reads each sequence's whole K/V once. Two choices keep the GPU busy:

* *GQA packing.* One program serves all the query heads that share a KV
  head, as the rows of one ``[heads, head_dim]`` tile (padded to 16 rows),
  so each K/V tile is read once per KV head rather than once per query head,
  and ``q @ K^T`` and ``P @ V`` are matrix products (``tl.dot``, tensor cores).
* *Split-KV (flash-decoding).* With few sequences there are too few
  (sequence, KV head) programs to fill the GPU, so each sequence's keys are
  cut into ``num_splits`` ranges handled by separate programs. Each writes a
  partial output normalized by its own softmax sum, plus that sum's
  log-sum-exp; a second kernel merges the partials, weighting each by
  ``exp(lse_i - max lse)``. The split count depends only on the batch size,
  never on sequence lengths, so a CUDA graph captured for a batch size
  stays valid; each sequence cuts its own length into that many ranges.

**Prefill** (several new tokens: a prompt, a chunk of one, or the tail of a
prompt whose prefix came from the prefix cache) is bound by arithmetic.
Each program takes a tile of :data:`PREFILL_TILE` queries of one sequence
and one query head and runs the flash-attention loop over the sequence's
pages, masking causally only in the key tiles that cross the diagonal.

**8-bit pages** (``kv_cache_dtype="fp8"``) are read as they are stored:
each K/V tile is loaded as float8 and widened in registers to the query's
dtype (exact: every float8 value is a bfloat16 or float16 value), and its
per-token scale (a power of two, :mod:`kvpage.kv.format`) is folded into
the scores (``q . (s k) = s (q . k)``) and into the probabilities before
``P @ V`` (there times ``2**VALUE_OFFSET``, the format's largest exponent,
taken back out of the float32 sum at the end: E5M2's scales are small enough
to push probabilities into float16's subnormals otherwise), so a tile costs
a multiply on a ``[rows, keys]`` tile rather than on
the ``[keys, head_dim]`` data, and there is no separate dequantization pass.
Decode loads a tile's scale bytes (and page ids) one tile ahead, and runs
smaller programs than for 16-bit pages (:func:`decode_tuning`): a tile of
8-bit pages is half the bytes, so the GPU needs more of them in flight.

Both use the online softmax in base 2 (``exp2`` of scores pre-multiplied by
``log2(e)``), accumulate in float32, and use IEEE float32 products for
float32 inputs (never tf32), so float32 runs match the reference closely.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvpage.ops.fp8 import CacheScales, format_of
from kvpage.ops.metadata import PREFILL_TILE, AttentionMetadata
from kvpage.ops.triton_fp8 import power_of_two

__all__ = ["DecodeTuning", "decode_num_splits", "decode_tuning", "paged_attention"]

LOG2E = 1.4426950408889634
MAX_SPLITS = 16


@functools.cache
def _num_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device, waves: int = 2) -> int:
    """How many key ranges each decoding sequence is cut into: enough programs for about ``waves`` waves.

    A power of two, at most :data:`MAX_SPLITS`. (Off a GPU, under the
    Triton interpreter, 8 multiprocessors are assumed so tests see both paths.)
    """
    if device.type == "cuda":
        multiprocessors = _num_multiprocessors(device.index if device.index is not None
                                               else torch.cuda.current_device())
    else:
        multiprocessors = 8
    wanted = triton.cdiv(waves * multiprocessors, num_seqs * num_kv_heads)
    return min(MAX_SPLITS, triton.next_power_of_2(wanted))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32: IEEE float32 products for float32 inputs (never tf32), else on
    tensor cores in ``b``'s dtype (the softmax probabilities are rounded to it, as flash attention does)."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def _load_tile(cache_ptr, slot, dims, mask, dtype: tl.constexpr, SCALED: tl.constexpr, DOT_FP16: tl.constexpr):
    """A ``[keys, head_dim]`` K or V tile; 8-bit values widened (exactly) to float16 for 16-bit queries (one
    conversion instruction a pair on the GPU), or to the query's dtype (float32)."""
    tile = tl.load(cache_ptr + slot[:, None] + dims[None, :], mask=mask, other=0.0)
    if SCALED:
        if DOT_FP16:
            tile = tile.to(tl.float16)
        else:
            tile = tile.to(dtype)
    return tile


@triton.jit
def _scaled(tile, scale_ptr, scale_slot, valid, SCALED: tl.constexpr, OFFSET: tl.constexpr = 0):
    """``tile [rows, keys]`` times each key's scale (an 8-bit cache's) times ``2**OFFSET``, or as it is."""
    if SCALED:
        exponent = tl.minimum(tl.load(scale_ptr + scale_slot, mask=valid, other=127).to(tl.int32) + OFFSET, 254)
        tile = tile * power_of_two(exponent)[None, :]
    return tile


@triton.jit
def _tile_pages(table, keys, hi, key_scale_ptr, value_scale_ptr, stride_scale_page, stride_scale_slot, kv_head,
                BLOCK_SIZE: tl.constexpr, SCALED: tl.constexpr):
    """The pages of ``keys`` and, for an 8-bit cache, their K and V scale bytes (int32; 127 past ``hi``)."""
    valid = keys < hi
    page = tl.load(table + keys // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    key_exp = tl.full(keys.shape, 127, tl.int32)
    value_exp = key_exp
    if SCALED:
        slot = page * stride_scale_page + (keys % BLOCK_SIZE) * stride_scale_slot + kv_head
        key_exp = tl.load(key_scale_ptr + slot, mask=valid, other=127).to(tl.int32)
        value_exp = tl.load(value_scale_ptr + slot, mask=valid, other=127).to(tl.int32)
    return page, key_exp, value_exp


@triton.jit
def _decode_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, page_tables_ptr, seq_lens_ptr, query_start_ptr, decode_seqs_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    scale_log2, sliding_window,
    stride_query_token, stride_query_head, stride_out_token, stride_out_head,
    stride_cache_page, stride_cache_slot, stride_cache_head, stride_page_table,
    key_scale_ptr, value_scale_ptr, stride_scale_page, stride_scale_slot, SCALED: tl.constexpr,
    VALUE_OFFSET: tl.constexpr, VALUE_UNSCALE: tl.constexpr, DOT_FP16: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
    CARRY_PAGES: tl.constexpr = False,
):
    index = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(decode_seqs_ptr + index)
    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(query_start_ptr + seq).to(tl.int64)
    first_key = 0
    if sliding_window > 0:
        first_key = tl.maximum(seq_len - sliding_window, 0)
    # Ranges are whole BLOCK_N tiles, so only the last tile of a range needs a bound check.
    per_split = tl.cdiv(tl.cdiv(seq_len - first_key, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first_key + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    groups = tl.arange(0, BLOCK_GROUP)
    dims = tl.arange(0, BLOCK_DIM)
    group_mask = groups < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + groups
    query = tl.load(query_ptr + token * stride_query_token + heads[:, None] * stride_query_head + dims[None, :],
                    mask=group_mask[:, None] & dim_mask[None, :], other=0.0)
    if DOT_FP16:
        query = query.to(tl.float16)
    running_max = tl.full([BLOCK_GROUP], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_GROUP], tl.float32)
    acc = tl.zeros([BLOCK_GROUP, BLOCK_DIM], tl.float32)
    table = page_tables_ptr + seq.to(tl.int64) * stride_page_table
    # What a tile's addresses and scales come from (its pages, and an 8-bit cache's scale bytes) can be loaded a
    # tile ahead, so that their latency hides behind this tile's work (on the H200, 1.3x faster for 8-bit pages).
    # An 8-bit cache always carries them (its scale bytes are found through the pages); a 16-bit one may.
    if CARRY_PAGES:
        next_page, key_exp, value_exp = _tile_pages(table, lo + tl.arange(0, BLOCK_N), hi, key_scale_ptr,
                                                    value_scale_ptr, stride_scale_page, stride_scale_slot, kv_head,
                                                    BLOCK_SIZE, SCALED)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        valid = keys < hi
        if CARRY_PAGES:
            page = next_page
        else:
            page = tl.load(table + keys // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        if SCALED:
            key_factor = power_of_two(key_exp)
            value_factor = power_of_two(tl.minimum(value_exp + VALUE_OFFSET, 254))
        if CARRY_PAGES:
            next_page, key_exp, value_exp = _tile_pages(table, keys + BLOCK_N, hi, key_scale_ptr, value_scale_ptr,
                                                        stride_scale_page, stride_scale_slot, kv_head, BLOCK_SIZE,
                                                        SCALED)
        slot = page * stride_cache_page + (keys % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head
        kv_mask = valid[:, None] & dim_mask[None, :]
        key = _load_tile(key_cache_ptr, slot, dims, kv_mask, query.dtype, SCALED, DOT_FP16)
        scores = _dot(query, tl.trans(key), IEEE)
        if SCALED:
            scores = scores * key_factor[None, :]
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, 1)
        if SCALED:
            probs = probs * value_factor[None, :]
        value = _load_tile(value_cache_ptr, slot, dims, kv_mask, query.dtype, SCALED, DOT_FP16)
        acc = acc * correction[:, None] + _dot(probs, value, IEEE)
        running_max = new_max

    if SCALED:
        acc = acc * VALUE_UNSCALE  # 2**-VALUE_OFFSET
    # A range with no keys (short sequence, padding row) contributes nothing.
    nonempty = running_sum > 0
    result = acc / tl.where(nonempty, running_sum, 1.0)[:, None]
    out_mask = group_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        out = out_ptr + token * stride_out_token + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        partial = (index * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # [index, head, split]
        tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], result, mask=out_mask)
        lse = tl.where(nonempty, running_max + tl.log2(tl.where(nonempty, running_sum, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + partial, lse, mask=group_mask)


@triton.jit
def _merge_kernel(
    partial_out_ptr, partial_lse_ptr, query_start_ptr, decode_seqs_ptr, out_ptr,
    stride_out_token, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    index = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_DIM)
    dim_mask = dims < HEAD_DIM
    base = (index * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(partial_lse_ptr + base + splits)
    top = tl.max(lse, 0)
    weights = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)
    partials = tl.load(partial_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                       mask=dim_mask[None, :], other=0.0)
    total = tl.sum(weights, 0)
    result = tl.sum(partials * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    token = tl.load(query_start_ptr + tl.load(decode_seqs_ptr + index)).to(tl.int64)
    tl.store(out_ptr + token * stride_out_token + head * stride_out_head + dims, result.to(out_ptr.dtype.element_ty),
             mask=dim_mask)


@triton.jit
def _prefill_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, page_tables_ptr, seq_lens_ptr, query_start_ptr, tiles_ptr, out_ptr,
    scale_log2, sliding_window,
    stride_query_token, stride_query_head, stride_out_token, stride_out_head,
    stride_cache_page, stride_cache_slot, stride_cache_head, stride_page_table,
    key_scale_ptr, value_scale_ptr, stride_scale_page, stride_scale_slot, SCALED: tl.constexpr,
    VALUE_OFFSET: tl.constexpr, VALUE_UNSCALE: tl.constexpr, DOT_FP16: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tiles_ptr + 2 * tile)
    tile_start = tl.load(tiles_ptr + 2 * tile + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    query_begin = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_begin
    context_len = seq_len - query_len

    rows = tile_start + tl.arange(0, BLOCK_M)  # query index within the sequence's new tokens
    row_mask = rows < query_len
    positions = context_len + rows
    dims = tl.arange(0, BLOCK_DIM)
    dim_mask = dims < HEAD_DIM
    tokens = (query_begin + rows).to(tl.int64)
    query = tl.load(query_ptr + tokens[:, None] * stride_query_token + head * stride_query_head + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    if DOT_FP16:
        query = query.to(tl.float16)

    last_position = context_len + tl.minimum(tile_start + BLOCK_M, query_len) - 1
    first_key = 0
    if sliding_window > 0:
        first_key = tl.maximum(context_len + tile_start - sliding_window + 1, 0)
        first_key = (first_key // BLOCK_N) * BLOCK_N
    # Key tiles wholly at or before the tile's first query need no causal mask.
    unmasked_end = context_len + tile_start
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DIM], tl.float32)
    table = page_tables_ptr + seq.to(tl.int64) * stride_page_table
    for start in range(first_key, last_position + 1, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys <= last_position
        page = tl.load(table + keys // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot = page * stride_cache_page + (keys % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head
        kv_mask = key_valid[:, None] & dim_mask[None, :]
        scale_slot = page * stride_scale_page + (keys % BLOCK_SIZE) * stride_scale_slot + kv_head
        key = _load_tile(key_cache_ptr, slot, dims, kv_mask, query.dtype, SCALED, DOT_FP16)
        scores = _dot(query, tl.trans(key), IEEE)
        scores = _scaled(scores, key_scale_ptr, scale_slot, key_valid, SCALED) * scale_log2
        if start + BLOCK_N > unmasked_end or sliding_window > 0:
            visible = (keys[None, :] <= positions[:, None]) & key_valid[None, :]
            if sliding_window > 0:
                visible = visible & (keys[None, :] > positions[:, None] - sliding_window)
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # Rows that have seen no visible key yet keep a -inf max; shift them by 0 instead.
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)
        probs = tl.exp2(scores - shift[:, None])
        correction = tl.exp2(running_max - shift)
        running_sum = running_sum * correction + tl.sum(probs, 1)
        value = _load_tile(value_cache_ptr, slot, dims, kv_mask, query.dtype, SCALED, DOT_FP16)
        weights = _scaled(probs, value_scale_ptr, scale_slot, key_valid, SCALED, VALUE_OFFSET)
        acc = acc * correction[:, None] + _dot(weights, value, IEEE)
        running_max = new_max
    if SCALED:
        acc = acc * VALUE_UNSCALE  # 2**-VALUE_OFFSET
    result = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
             result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@dataclass(frozen=True)
class DecodeTuning:
    """How the decode kernel cuts its work: keys a tile, warps and pipeline stages a program, programs (key
    ranges a sequence, :func:`decode_num_splits`) for about ``waves`` waves of the GPU, and whether a tile's
    page ids of 16-bit pages are loaded a tile ahead (``carry_pages``; an 8-bit cache's page ids and scale bytes
    always are)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default
    waves: int = 2
    carry_pages: bool = False

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeTuning.block_n must be a power of two >= 16, got {self.block_n}")


def decode_tuning(dtype: torch.dtype, scaled: bool) -> DecodeTuning:
    """The decode kernel's tuning for queries of ``dtype`` over 16-bit or 8-bit (``scaled``) pages.

    Measured on the H200 (docs/benchmarks.md, "FP8 KV cache"): 64 keys a tile and 4 warps read 16-bit pages at
    copy bandwidth (fp32 tiles are twice as wide, so 32). 8-bit pages take 64 keys, 2 warps and their pages
    loaded a tile ahead: smaller programs, more of them resident, more loads in flight (0.70-0.73x the time
    of bf16 pages at batch >= 64 and context >= 2048, where 64 keys and 4 warps took 1.2-1.6x). 128 or 256 keys,
    8 warps, other stage counts and wave counts, scores as ``K @ q^T``, and products on FP8 tensor cores of the
    query and the probabilities split into E4M3 parts were slower.
    """
    if dtype == torch.float32:
        return DecodeTuning(block_n=32)
    if scaled:
        return DecodeTuning(block_n=64, num_warps=2)
    return DecodeTuning(block_n=64)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    num_splits: int | None = None, scales: CacheScales | None = None,
                    tuning: DecodeTuning | None = None) -> torch.Tensor:
    """The kernels' version of :func:`kvpage.ops.attention.paged_attention` (which checks the arguments).

    ``num_splits`` (a power of two) overrides :func:`decode_num_splits`; ``scales`` are an 8-bit cache's;
    ``tuning`` overrides :func:`decode_tuning` (benchmarks sweep it).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    work = meta.kernel
    output = torch.empty_like(query)
    ieee = query.dtype == torch.float32
    block_dim = max(16, triton.next_power_of_2(head_dim))
    window = sliding_window or 0
    offset = format_of(key_cache.dtype).max_exponent if scales is not None else 0
    fp8 = {"SCALED": scales is not None, "VALUE_OFFSET": offset, "VALUE_UNSCALE": 2.0 ** -offset,
           "DOT_FP16": scales is not None and not ieee}
    common = (scale * LOG2E, window, query.stride(0), query.stride(1), output.stride(0), output.stride(1),
              key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), meta.page_tables.stride(0),
              *((scales.key, scales.value, scales.key.stride(0), scales.key.stride(1)) if scales is not None
                else (key_cache, value_cache, 0, 0)))
    if work.num_decode:
        tuning = tuning or decode_tuning(query.dtype, scales is not None)
        if num_splits is None:
            num_splits = decode_num_splits(work.num_decode, num_kv_heads, query.device, tuning.waves)
        if num_splits > 1:
            partial_out = torch.empty((work.num_decode, num_q_heads, num_splits, head_dim), dtype=torch.float32,
                                      device=query.device)
            partial_lse = torch.empty((work.num_decode, num_q_heads, num_splits), dtype=torch.float32,
                                      device=query.device)
        else:
            partial_out = partial_lse = output  # unused
        stages = {} if tuning.num_stages is None else {"num_stages": tuning.num_stages}
        _decode_kernel[(work.num_decode, num_kv_heads, num_splits)](
            query, key_cache, value_cache, meta.page_tables, work.seq_lens, work.query_start, work.decode_seqs,
            output, partial_out, partial_lse, *common, **fp8,
            GROUP=group, BLOCK_GROUP=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
            BLOCK_DIM=block_dim, BLOCK_SIZE=block_size, BLOCK_N=tuning.block_n, NUM_SPLITS=num_splits, IEEE=ieee,
            num_warps=tuning.num_warps, CARRY_PAGES=tuning.carry_pages or scales is not None,
            **stages,
        )
        if num_splits > 1:
            _merge_kernel[(work.num_decode, num_q_heads)](
                partial_out, partial_lse, work.query_start, work.decode_seqs, output,
                output.stride(0), output.stride(1),
                HEAD_DIM=head_dim, BLOCK_DIM=block_dim, NUM_SPLITS=num_splits,
            )
    if work.num_prefill_tiles:
        _prefill_kernel[(work.num_prefill_tiles, num_q_heads)](
            query, key_cache, value_cache, meta.page_tables, work.seq_lens, work.query_start, work.prefill_tiles,
            output, *common, **fp8,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_DIM=block_dim, BLOCK_SIZE=block_size,
            BLOCK_M=PREFILL_TILE, BLOCK_N=32 if ieee else 64, IEEE=ieee, num_warps=4,
        )
    return output
