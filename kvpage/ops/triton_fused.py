"""Triton kernels that fuse the small per-token operations of a decoder layer.

In a decode step each of these touches a few kilobytes per token, so as
separate torch operations they cost a launch and a round trip through
device memory each: about twenty kernels per layer between two matrix
products, measured at a quarter of a small model's decode step on an H200.
Fused, each is one pass:

* ``add_rms_norm``: residual add, then RMSNorm (one program per token);
* ``qkv_norm_rope_cache``: from the fused QKV projection, per-head RMSNorm
  of q and k (Qwen3), RoPE on q and k, the store of k and v into their cache
  slots (quantized, with their scale bytes, into an 8-bit cache), and q
  written out for attention (one program per token and head);
* ``silu_and_mul``: ``silu(gate) * up`` of the fused gate/up projection.

Each rounds to the model dtype where the torch reference
(:mod:`kvpage.ops.fused`) does. Compiled for a GPU, a product the reference
rounds to half precision may stay in float32 (the compiler folds the round
trip), and ``exp``/``rsqrt`` may differ in their last float32 bit, so
half-precision results nearly always equal the reference's and otherwise
differ by a unit in the last place (tests/test_fused_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpage.ops.fp8 import CacheScales
from kvpage.ops.triton_fp8 import fp8_constants, quantize_scaled, scale_exponent

__all__ = ["add_rms_norm", "qkv_norm_rope_cache", "silu_and_mul"]


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, stride_x, stride_residual,
                         size, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the model dtype before it is normalized, as the reference does.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_residual + cols, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * size + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inverse = tl.rsqrt(tl.sum(x32 * x32, axis=0) / size + eps)
    normed = (x32 * inverse).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * size + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; without a residual, ``(rms_norm(x), x)``."""
    size = x.shape[-1]
    rows = x.numel() // size
    out = torch.empty((rows, size), dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else x
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, total, x.stride(-2),
            residual.stride(-2) if residual is not None else 0, size, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(size), num_warps=4)
    return out, total


@triton.jit
def _store_head(cache_ptr, scale_ptr, slot, kv_head, x1, x2, dims, mask,
                NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, SCALED: tl.constexpr, MAX_EXPONENT: tl.constexpr,
                MAX_VALUE: tl.constexpr, MANTISSA: tl.constexpr, MIN_NORMAL: tl.constexpr,
                SUBNORMAL_MAGIC: tl.constexpr):
    """One KV head's vector (halves ``x1``, ``x2``) into its cache slot; quantized, with its scale byte, when
    the cache is 8-bit (masked lanes hold 0, so they do not move the largest magnitude)."""
    destination = cache_ptr + slot * (NUM_KV_HEADS * 2 * HALF) + kv_head * (2 * HALF)
    if SCALED:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        exponent = scale_exponent(tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0)), MAX_EXPONENT)
        x1 = quantize_scaled(a, exponent, MAX_VALUE, MANTISSA, MIN_NORMAL, SUBNORMAL_MAGIC)
        x2 = quantize_scaled(b, exponent, MAX_VALUE, MANTISSA, MIN_NORMAL, SUBNORMAL_MAGIC)
        tl.store(scale_ptr + slot * NUM_KV_HEADS + kv_head, exponent.to(tl.uint8))
    tl.store(destination + dims, x1.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(destination + HALF + dims, x2.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_norm_rope_cache_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, slot_mapping_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr,
    stride_qkv, stride_table, eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    QK_NORM: tl.constexpr, SCALED: tl.constexpr, MAX_EXPONENT: tl.constexpr, MAX_VALUE: tl.constexpr,
    MANTISSA: tl.constexpr, MIN_NORMAL: tl.constexpr, SUBNORMAL_MAGIC: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_HALF)
    mask = dims < HALF
    head_dim = 2 * HALF
    source = qkv_ptr + token * stride_qkv + head * head_dim
    x1 = tl.load(source + dims, mask=mask, other=0.0)
    x2 = tl.load(source + HALF + dims, mask=mask, other=0.0)
    dtype = x1.dtype
    is_query = head < NUM_Q_HEADS
    is_value = head >= NUM_Q_HEADS + NUM_KV_HEADS
    slot = tl.load(slot_mapping_ptr + token)
    if is_value:
        if slot >= 0:
            _store_head(value_cache_ptr, value_scale_ptr, slot, head - NUM_Q_HEADS - NUM_KV_HEADS, x1, x2, dims,
                        mask, NUM_KV_HEADS, HALF, SCALED, MAX_EXPONENT, MAX_VALUE, MANTISSA, MIN_NORMAL,
                        SUBNORMAL_MAGIC)
    else:
        if QK_NORM:
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            inverse = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / head_dim + eps)
            norm_ptr = q_norm_ptr if is_query else k_norm_ptr
            w1 = tl.load(norm_ptr + dims, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(norm_ptr + HALF + dims, mask=mask, other=0.0).to(tl.float32)
            x1 = ((a * inverse).to(dtype).to(tl.float32) * w1).to(dtype)
            x2 = ((b * inverse).to(dtype).to(tl.float32) * w2).to(dtype)
        position = tl.load(positions_ptr + token).to(tl.int64)
        table = position * stride_table
        cos1 = tl.load(cos_ptr + table + dims, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF + dims, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + dims, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + HALF + dims, mask=mask, other=0.0).to(tl.float32)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the model dtype as the reference rounds it.
        out1 = ((a * cos1).to(dtype).to(tl.float32) + (-b * sin1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((b * cos2).to(dtype).to(tl.float32) + (a * sin2).to(dtype).to(tl.float32)).to(dtype)
        if is_query:
            destination = query_ptr + token * (NUM_Q_HEADS * head_dim) + head * head_dim
            tl.store(destination + dims, out1, mask=mask)
            tl.store(destination + HALF + dims, out2, mask=mask)
        elif slot >= 0:
            _store_head(key_cache_ptr, key_scale_ptr, slot, head - NUM_Q_HEADS, out1, out2, dims, mask,
                        NUM_KV_HEADS, HALF, SCALED, MAX_EXPONENT, MAX_VALUE, MANTISSA, MIN_NORMAL, SUBNORMAL_MAGIC)


def qkv_norm_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                        sin_table: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                        eps: float, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, num_q_heads: int, scales: CacheScales | None = None
                        ) -> torch.Tensor:
    """Queries ``[T, Hq, D]`` ready for attention; k and v go straight into their cache slots (-1: skip).

    ``qkv`` is ``[T, (Hq + 2 Hkv) D]`` with unit stride in its last dimension.
    """
    num_tokens = qkv.shape[0]
    _, _, num_kv_heads, head_dim = key_cache.shape
    query = torch.empty((num_tokens, num_q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens:
        half = head_dim // 2
        fp8 = (fp8_constants(key_cache.dtype) if scales is not None else
               {"MAX_EXPONENT": 0, "MAX_VALUE": 0.0, "MANTISSA": 0, "MIN_NORMAL": 0.0, "SUBNORMAL_MAGIC": 0.0})
        _qkv_norm_rope_cache_kernel[(num_tokens, num_q_heads + 2 * num_kv_heads)](
            qkv, positions, cos_table, sin_table, q_norm if q_norm is not None else qkv,
            k_norm if k_norm is not None else qkv, slot_mapping, query, key_cache, value_cache,
            scales.key if scales is not None else key_cache, scales.value if scales is not None else value_cache,
            qkv.stride(0), cos_table.stride(0), eps,
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            QK_NORM=q_norm is not None, SCALED=scales is not None, num_warps=1, **fp8)
    return query


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_gate_up, size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(gate_up_ptr + row * stride_gate_up + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_gate_up + size + cols, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # silu, rounded as torch rounds it
    tl.store(out_ptr + row * size + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[T, 2 I]`` -> ``[T, I]``."""
    rows, width = gate_up.shape
    size = width // 2
    out = torch.empty((rows, size), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, triton.next_power_of_2(size))
        _silu_and_mul_kernel[(rows, triton.cdiv(size, block))](gate_up, out, gate_up.stride(0), size, BLOCK=block,
                                                                num_warps=4)
    return out
