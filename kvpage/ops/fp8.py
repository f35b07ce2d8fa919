"""8-bit KV pages in torch: the store's quantization and the read's dequantization (the specification).

The format is :mod:`kvpage.kv.format`'s: each head vector of K or V is
stored as float8 values plus one scale byte ``e`` (a power of two,
``2**(e - 127)``). The Triton kernels compute the same bytes (the same
integer rule for ``e``, an exact power-of-two product, round-to-nearest-even
into float8) and read them the same way, so the torch paths here are what
they are tested against.

Torch cannot index float8 tensors on a CPU (no ``index_copy_``/``index_select``
kernels for them), so page moves go through a ``uint8`` view of the same
bytes (:func:`as_bytes`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvpage.kv.format import FP8_FORMATS, MAX_EXPONENT, MIN_EXPONENT, KVFormat

__all__ = ["CacheScales", "LayerKV", "as_bytes", "check_device", "dequantize", "format_of", "is_fp8", "quantize",
           "storage_dtype"]

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
MANTISSA_75 = 3 << 21  # the float32 mantissa field of 1.75


class CacheScales(NamedTuple):
    """One layer's scale bytes of an 8-bit cache: ``key`` and ``value``, each ``[num_pages, block_size, Hkv]``."""

    key: torch.Tensor
    value: torch.Tensor


class LayerKV(NamedTuple):
    """One layer's view of the KV cache: ``key`` and ``value`` ``[num_pages, block_size, Hkv, D]``, and the
    scale bytes when they are 8-bit (None otherwise)."""

    key: torch.Tensor
    value: torch.Tensor
    scales: CacheScales | None = None


def storage_dtype(kv: KVFormat, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype pages of ``kv`` are stored in."""
    return FP8_DTYPES[kv.name] if kv.scaled else model_dtype


def check_device(kv_cache_dtype: str, dtype: torch.dtype, device: torch.device, uses_kernels: bool) -> None:
    """Refuse an 8-bit cache where it cannot be stored: the Triton kernels convert to and from float8 in
    hardware, which NVIDIA GPUs have from compute capability 8.9 (Ada, Hopper) on."""
    if not is_fp8(dtype) or device.type != "cuda" or not uses_kernels:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs a GPU of compute capability 8.9 or newer for the "
                         f"Triton kernels' float8 conversions, got {major}.{minor} on {device}; use "
                         "kv_cache_dtype='auto', or attention_backend='torch'")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def format_of(dtype: torch.dtype) -> KVFormat:
    """The 8-bit format of a float8 cache dtype."""
    return FP8_FORMATS["fp8_e4m3" if dtype == torch.float8_e4m3fn else "fp8_e5m2"]


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as ``uint8`` (a view) when it is float8, else ``tensor`` itself."""
    return tensor.view(torch.uint8) if is_fp8(tensor.dtype) else tensor


def _power_of_two(exponents: torch.Tensor) -> torch.Tensor:
    """``2**(e - 127)`` as float32, built from its bits (exact; ``e`` in [1, 254])."""
    return (exponents.to(torch.int32) << 23).view(torch.float32)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` as float8 ``dtype`` values ``[..., D]`` and scale bytes ``[...]`` (uint8).

    The scale byte is the smallest ``e`` (clamped to [1, 253]) with
    ``amax <= 1.75 * 2**(max_exponent + e - 127)``, computed from the float32
    bits of ``amax`` (exponent field ``E``, mantissa field ``M``) as
    ``E - max_exponent + (M > mantissa of 1.75)``.
    """
    kv = format_of(dtype)
    x32 = x.to(torch.float32)
    bits = x32.abs().amax(dim=-1).view(torch.int32)
    exponents = ((bits >> 23) - kv.max_exponent + ((bits & 0x7FFFFF) > MANTISSA_75).to(torch.int32))
    exponents = exponents.clamp(MIN_EXPONENT, MAX_EXPONENT)
    inverse = _power_of_two(254 - exponents)  # 2**(127 - e): exact, so the division is too
    values = (x32 * inverse[..., None]).clamp(-kv.max_value, kv.max_value).to(dtype)
    return values, exponents.to(torch.uint8)


def dequantize(values: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """float32 ``values [..., D] * 2**(exponents [...] - 127)``."""
    return values.to(torch.float32) * _power_of_two(exponents)[..., None]
