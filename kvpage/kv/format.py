"""How one token's K/V is stored in a page, and what it costs in bytes (pure Python).

A page holds ``block_size`` tokens of K and V for every layer. In the
default format (``kv_cache_dtype="auto"``) each value takes the model
dtype's bytes. The 8-bit formats halve that (a quarter of float32):

* **The value** is an OCP float8: E4M3 (``"fp8"``/``"fp8_e4m3"``, 3 mantissa
  bits, largest finite value 448) or E5M2 (``"fp8_e5m2"``, 2 mantissa bits,
  largest 57344). Values beyond the largest finite one saturate.
* **The scale** is one byte per token, KV head and K-or-V: a power of two
  stored as its biased exponent (the E8M0 of the OCP microscaling formats),
  so a stored value reads back as ``fp8 * 2**(scale - 127)``. The store
  picks the smallest power of two that brings the head vector's largest
  magnitude within the format's range (``kvpage.ops.fp8``).

Why a scale per token and head, and a power of two (``docs/architecture.md``
has the measurement on SmolLM2's real K/V):

* A token's scale depends on nothing but that token's own K/V, so a page's
  bytes do not depend on what else was in the batch or was stored before:
  prefix caching, copy-on-write, swap, chunked prefill and recompute all see
  exactly the bytes a lone run would. A scale per page or per head would have
  to grow (and requantize the page) whenever a larger value arrived.
* Outliers stay local: one 100x value raises its own head vector's scale,
  not the whole layer's (a fixed scale of 1.0 instead clips it at 448).
* A power of two makes both the store's division and the read's product
  exact, so kernels and the reference agree bit for bit on what is stored,
  and one byte is enough (an exact float32 scale would cost four, 6% of a
  64-wide head instead of 1.6%).

The scale's bytes count in every capacity figure: :meth:`KVFormat.token_bytes`
is the one formula the engine's sizing and the planner both use.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpage.modes import KVCacheDtype

__all__ = ["EXPONENT_BIAS", "FP8_FORMATS", "KVFormat", "MAX_EXPONENT", "MIN_EXPONENT", "kv_format"]

EXPONENT_BIAS = 127
# A scale byte stays in [1, 253]: 2**(byte - 127) and its inverse 2**(127 - byte) are then both normal floats.
MIN_EXPONENT, MAX_EXPONENT = 1, 253


@dataclass(frozen=True)
class KVFormat:
    """One way of storing K/V: bytes a value, scale bytes a head vector, and the 8-bit format's range."""

    name: str  # "auto" (the model dtype), "fp8_e4m3" or "fp8_e5m2"
    value_bytes: int
    scale_bytes: int  # per token, per KV head, per K or V; 0 when values are stored unscaled
    max_exponent: int = 0  # the largest finite value is 1.75 * 2**max_exponent (E4M3: 8, E5M2: 15)
    mantissa_bits: int = 0  # of the 8-bit value (E4M3: 3, E5M2: 2)
    min_normal_exponent: int = 0  # the smallest normal value is 2**min_normal_exponent (E4M3: -6, E5M2: -14)

    @property
    def scaled(self) -> bool:
        return self.scale_bytes > 0

    @property
    def max_value(self) -> float:
        return 1.75 * 2.0 ** self.max_exponent

    def token_bytes(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes one token's K and V take across all layers, scales included."""
        return 2 * num_layers * num_kv_heads * (head_dim * self.value_bytes + self.scale_bytes)


FP8_FORMATS: dict[str, KVFormat] = {
    "fp8_e4m3": KVFormat("fp8_e4m3", 1, 1, max_exponent=8, mantissa_bits=3, min_normal_exponent=-6),
    "fp8_e5m2": KVFormat("fp8_e5m2", 1, 1, max_exponent=15, mantissa_bits=2, min_normal_exponent=-14),
}
ALIASES = {"fp8": "fp8_e4m3"}


def kv_format(kv_cache_dtype: KVCacheDtype, model_dtype_bytes: int) -> KVFormat:
    """The format ``kv_cache_dtype`` names, for a model whose values take ``model_dtype_bytes`` bytes."""
    if kv_cache_dtype == "auto":
        return KVFormat("auto", model_dtype_bytes, 0)
    name = ALIASES.get(kv_cache_dtype, kv_cache_dtype)
    if name not in FP8_FORMATS:
        raise ValueError(f"kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2', got {kv_cache_dtype!r}")
    return FP8_FORMATS[name]

