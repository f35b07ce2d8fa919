"""The per-token operations around attention and the MLP, as fused steps.

Each function here is one step of a decoder layer and has two
implementations: the torch code below, which is the specification (it is
what transformers computes, rounding for rounding), and a Triton kernel in
:mod:`kvpage.ops.triton_fused` that does the same in one pass over memory.
``backend`` picks between them as for attention (``"auto"``: the kernels on
a CUDA tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpage.ops.attention import write_kv_cache
from kvpage.ops.fp8 import CacheScales
from kvpage.ops.metadata import wants_kernels

__all__ = ["add_rms_norm", "qkv_norm_rope_cache", "rms_norm_reference", "rope_rows", "silu_and_mul"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension in float32; the weight multiplies after rounding back (transformers')."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``, the sum in the model dtype; no residual: ``(rms_norm(x), x)``."""
    if wants_kernels(backend, x):
        from kvpage.ops import triton_fused

        return triton_fused.add_rms_norm(x, residual, weight, eps)
    total = x if residual is None else x + residual
    return rms_norm_reference(total, weight, eps), total


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x [T, heads, D]`` and per-token ``cos``/``sin`` ``[T, D]``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-second, first), dim=-1) * sin[:, None, :]


def rope_rows(cos_table: torch.Tensor, sin_table: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's rows ``[T, D]`` of the cos and sin tables, at ``positions``."""
    return cos_table.index_select(0, positions), sin_table.index_select(0, positions)


def qkv_norm_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                        sin_table: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                        eps: float, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, num_q_heads: int, backend: str = "auto",
                        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
                        scales: CacheScales | None = None) -> torch.Tensor:
    """From the fused projection ``qkv [T, (Hq + 2 Hkv) D]``: the rotated queries ``[T, Hq, D]``.

    On the way, q and k are RMS-normalized per head when ``q_norm``/``k_norm``
    are given (Qwen3), rotated by RoPE at ``positions`` (``cos_table`` and
    ``sin_table`` are ``[max_positions, D]``; ``angles``, when given, are
    those tables' rows at ``positions``, gathered once for all layers), and k
    and v are stored into the cache at ``slot_mapping`` (-1: not stored), quantized into an 8-bit cache
    whose scale bytes are ``scales``.
    """
    if wants_kernels(backend, qkv):
        from kvpage.ops import triton_fused

        return triton_fused.qkv_norm_rope_cache(qkv, positions, cos_table, sin_table, q_norm, k_norm, eps,
                                                key_cache, value_cache, slot_mapping, num_q_heads, scales)
    num_tokens = qkv.shape[0]
    _, _, num_kv_heads, head_dim = key_cache.shape
    cos, sin = angles if angles is not None else rope_rows(cos_table, sin_table, positions)
    # q and k side by side as heads of one [T, Hq + Hkv, D] view: one rotation covers both.
    query_key = qkv[:, : (num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_q_heads + num_kv_heads,
                                                                      head_dim)
    value = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        query_key = torch.cat((rms_norm_reference(query_key[:, :num_q_heads], q_norm, eps),
                               rms_norm_reference(query_key[:, num_q_heads:], k_norm, eps)), dim=1)
    query, key = _rotate(query_key, cos, sin).split([num_q_heads, num_kv_heads], dim=1)
    write_kv_cache(key, value, key_cache, value_cache, slot_mapping, backend="torch", scales=scales)
    return query


def silu_and_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[T, 2 I]``."""
    if wants_kernels(backend, gate_up):
        from kvpage.ops import triton_fused

        return triton_fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
