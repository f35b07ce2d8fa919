"""Triton kernels that move K/V data: the per-step cache write and whole-page copies.

**Cache write.** After the QKV projection each new token's K and V
(``[T, num_kv_heads, head_dim]``) go to one flat slot of the paged cache
(``page * block_size + offset``), given by the step's slot mapping. One
program stores one token's K and V rows; slot -1 (padding, e.g. the spare
rows of a CUDA-graph batch) stores nothing. Into an 8-bit cache it stores
each head vector quantized, and its scale byte (:mod:`kvpage.ops.triton_fp8`).
This replaces the reference's
boolean-mask indexing, which needs a device-to-host sync to size its result.

**Page copy.** Copy-on-write and swap move whole pages, in every layer's K
and V cache at once. The runner keeps all layers' caches in one tensor, so
one launch covers every layer: program ``(c, p)`` copies chunk ``c`` of pair
``p`` in all caches. All sources are read before any destination is
written (the copy goes through a gathered buffer only when a page is both a
source and a destination of the same call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpage.ops.fp8 import CacheScales
from kvpage.ops.transfer import to_device
from kvpage.ops.triton_fp8 import fp8_constants, quantize_scaled, scale_exponent

__all__ = ["copy_pages", "write_kv_cache"]


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    stride_key_token, stride_value_token,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        offsets = tl.arange(0, BLOCK)
        mask = offsets < ROW
        # One cache slot holds num_kv_heads * head_dim contiguous elements.
        destination = slot.to(tl.int64) * ROW + offsets
        key = tl.load(key_ptr + token.to(tl.int64) * stride_key_token + offsets, mask=mask)
        tl.store(key_cache_ptr + destination, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
        value = tl.load(value_ptr + token.to(tl.int64) * stride_value_token + offsets, mask=mask)
        tl.store(value_cache_ptr + destination, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_quantized(source_ptr, cache_ptr, scale_ptr, slot, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr, MAX_EXPONENT: tl.constexpr,
                     MAX_VALUE: tl.constexpr, MANTISSA: tl.constexpr, MIN_NORMAL: tl.constexpr,
                     SUBNORMAL_MAGIC: tl.constexpr):
    """One token's ``[heads, head_dim]`` row at ``source_ptr``, quantized into ``slot`` with its scale bytes."""
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_DIM)
    head_mask = heads < NUM_HEADS
    mask = head_mask[:, None] & (dims < HEAD_DIM)[None, :]
    offsets = heads[:, None] * HEAD_DIM + dims[None, :]
    x = tl.load(source_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exponent = scale_exponent(tl.max(tl.abs(x), axis=1), MAX_EXPONENT)
    values = quantize_scaled(x, exponent[:, None], MAX_VALUE, MANTISSA, MIN_NORMAL, SUBNORMAL_MAGIC)
    tl.store(cache_ptr + slot * (NUM_HEADS * HEAD_DIM) + offsets, values.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + slot * NUM_HEADS + heads, exponent.to(tl.uint8), mask=head_mask)


@triton.jit
def _write_kv_fp8_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr, slot_mapping_ptr,
    stride_key_token, stride_value_token,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr,
    MAX_EXPONENT: tl.constexpr, MAX_VALUE: tl.constexpr, MANTISSA: tl.constexpr, MIN_NORMAL: tl.constexpr,
    SUBNORMAL_MAGIC: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        _store_quantized(key_ptr + token * stride_key_token, key_cache_ptr, key_scale_ptr, slot,
                         NUM_HEADS, HEAD_DIM, BLOCK_HEADS, BLOCK_DIM, MAX_EXPONENT, MAX_VALUE, MANTISSA,
                         MIN_NORMAL, SUBNORMAL_MAGIC)
        _store_quantized(value_ptr + token * stride_value_token, value_cache_ptr, value_scale_ptr, slot,
                         NUM_HEADS, HEAD_DIM, BLOCK_HEADS, BLOCK_DIM, MAX_EXPONENT, MAX_VALUE, MANTISSA,
                         MIN_NORMAL, SUBNORMAL_MAGIC)


def _token_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with each token's heads * head_dim elements contiguous (a view when they already are)."""
    _, heads, dim = tensor.shape
    if tensor.stride(2) == 1 and tensor.stride(1) == dim:
        return tensor
    return tensor.contiguous()


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor, scales: CacheScales | None = None) -> None:
    """Scatter ``key``/``value`` ``[T, Hkv, D]`` into the caches at ``slot_mapping`` (-1: skip).

    Shapes are checked by :func:`kvpage.ops.attention.write_kv_cache`, the public entry.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    key, value = _token_rows(key), _token_rows(value)
    _, _, num_heads, head_dim = key_cache.shape
    if scales is not None:
        _write_kv_fp8_kernel[(num_tokens,)](
            key, value, key_cache, value_cache, scales.key, scales.value, slot_mapping,
            key.stride(0), value.stride(0),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_HEADS=triton.next_power_of_2(num_heads),
            BLOCK_DIM=triton.next_power_of_2(head_dim), **fp8_constants(key_cache.dtype))
        return
    row = num_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), value.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row),
    )


@triton.jit
def _copy_pages_kernel(
    source_ptr, destination_ptr, pairs_ptr, num_caches,
    stride_source_cache, stride_source_page, stride_destination_cache, stride_destination_page,
    PAGE: tl.constexpr, CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    source_page = tl.load(pairs_ptr + 2 * pair).to(tl.int64)
    destination_page = tl.load(pairs_ptr + 2 * pair + 1).to(tl.int64)
    offsets = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < PAGE
    for cache in range(num_caches):
        data = tl.load(source_ptr + cache * stride_source_cache + source_page * stride_source_page + offsets,
                       mask=mask)
        tl.store(destination_ptr + cache * stride_destination_cache + destination_page * stride_destination_page
                 + offsets, data, mask=mask)


def _launch_copy(source: torch.Tensor, destination: torch.Tensor, pairs: torch.Tensor) -> None:
    num_caches, _, page = source.shape
    chunk = min(triton.next_power_of_2(page), 4096)
    grid = (pairs.shape[0], triton.cdiv(page, chunk))
    _copy_pages_kernel[grid](
        source, destination, pairs, num_caches,
        source.stride(0), source.stride(1), destination.stride(0), destination.stride(1),
        PAGE=page, CHUNK=chunk,
    )


def copy_pages(caches: torch.Tensor, copies: list[tuple[int, int]]) -> None:
    """Copy pages ``src -> dst`` in every cache of ``caches`` ``[num_caches, num_pages, page_elements]``."""
    if not copies:
        return
    num_pages = caches.shape[1]
    for src, dst in copies:
        if not (0 <= src < num_pages and 0 <= dst < num_pages):
            raise ValueError(f"copy ({src} -> {dst}) has a page id outside [0, {num_pages}) in copies")
    sources = {src for src, _ in copies}
    pairs = to_device(copies, torch.int32, caches.device)
    if sources.isdisjoint(dst for _, dst in copies):
        _launch_copy(caches, caches, pairs)
        return
    # A page is read and overwritten by this call: stage the sources first.
    staged = torch.empty((caches.shape[0], len(copies), caches.shape[2]), dtype=caches.dtype, device=caches.device)
    gather = to_device([(src, index) for index, (src, _) in enumerate(copies)], torch.int32, caches.device)
    _launch_copy(caches, staged, gather)
    scatter = to_device([(index, dst) for index, (_, dst) in enumerate(copies)], torch.int32, caches.device)
    _launch_copy(staged, caches, scatter)
