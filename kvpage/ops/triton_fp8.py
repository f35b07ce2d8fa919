"""Triton helpers for 8-bit KV pages: the scale rule and the power of two, as ``@triton.jit`` functions.

The kernels that store K/V (:mod:`kvpage.ops.triton_cache`,
:mod:`kvpage.ops.triton_fused`) and read it (:mod:`kvpage.ops.triton_attention`)
call these, so the scale rule is written once for the GPU; it is the same
integer rule as the torch specification :func:`kvpage.ops.fp8.quantize`
(from the float32 bits of a head vector's largest magnitude), which is what
the tests hold them to.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kvpage.ops.fp8 import format_of

__all__ = ["fp8_constants", "power_of_two", "quantize_scaled", "scale_exponent"]


def fp8_constants(dtype: torch.dtype) -> dict[str, Any]:
    """The constexpr arguments of a kernel that stores values of float8 ``dtype``."""
    kv = format_of(dtype)
    return {"MAX_EXPONENT": kv.max_exponent, "MAX_VALUE": kv.max_value, "MANTISSA": kv.mantissa_bits,
            "MIN_NORMAL": 2.0 ** kv.min_normal_exponent,
            "SUBNORMAL_MAGIC": 2.0 ** (kv.min_normal_exponent - kv.mantissa_bits + 23)}


@triton.jit
def scale_exponent(amax, MAX_EXPONENT: tl.constexpr):
    """The scale byte (as int32) for head vectors of largest magnitude ``amax`` (float32, >= 0)."""
    bits = amax.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) - MAX_EXPONENT + ((bits & 0x7FFFFF) > 6291456).to(tl.int32)  # 6291456: 1.75's mantissa
    return tl.minimum(tl.maximum(exponent, 1), 253)


@triton.jit
def power_of_two(exponent):
    """``2**(exponent - 127)`` as float32, built from its bits (exact)."""
    return (exponent.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_format(y, MANTISSA: tl.constexpr, MIN_NORMAL: tl.constexpr, SUBNORMAL_MAGIC: tl.constexpr):
    """float32 ``y`` rounded (to nearest, ties to even) onto the float8 grid, still as float32.

    The rounding is done here, not by the float8 cast, because the Triton interpreter (how CI runs these
    kernels) rounds float32 -> float8 wrongly near the top of a binade (-127.99 becomes -64); the cast of a
    value already on the grid is exact everywhere. Normal values round on their bits (the carry moves into
    the exponent by itself); below the smallest normal value the grid is uniform, and adding then
    subtracting ``2**(min_normal - mantissa + 23)`` rounds onto it in float32's own round-to-nearest-even.
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    magnitude_bits = bits & 0x7FFFFFFF
    DROP: tl.constexpr = 23 - MANTISSA
    rounded = (magnitude_bits + ((1 << (DROP - 1)) - 1) + ((magnitude_bits >> DROP) & 1)) & ~((1 << DROP) - 1)
    magnitude = magnitude_bits.to(tl.float32, bitcast=True)
    small = ((magnitude + SUBNORMAL_MAGIC) - SUBNORMAL_MAGIC).to(tl.int32, bitcast=True)
    return (tl.where(magnitude < MIN_NORMAL, small, rounded) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quantize_scaled(x, exponent, MAX_VALUE: tl.constexpr, MANTISSA: tl.constexpr, MIN_NORMAL: tl.constexpr,
                    SUBNORMAL_MAGIC: tl.constexpr):
    """float32 ``x / 2**(exponent - 127)`` (exact), saturated to the format's range and rounded onto its grid:
    the cast to float8 that follows is exact."""
    scaled = tl.minimum(tl.maximum(x * power_of_two(254 - exponent), -MAX_VALUE), MAX_VALUE)
    return _round_to_format(scaled, MANTISSA, MIN_NORMAL, SUBNORMAL_MAGIC)
