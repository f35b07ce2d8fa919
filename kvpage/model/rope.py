"""Rotary position embeddings (RoPE) with the scaling variants of Llama-family models.

RoPE rotates each pair of query/key channels ``(i, i + head_dim/2)`` by the
angle ``position * inv_freq[i]``.  Scaling schemes only change ``inv_freq``
(and, for yarn, multiply cos/sin by an attention factor), so everything is
precomputed once into cos/sin tables indexed by position (computed in
float32, stored in the model dtype), which the fused RoPE step
(:func:`kvpage.ops.fused.qkv_norm_rope_cache`) reads by each token's
position, however tokens are batched.

The frequency formulas deliberately follow the order of floating point
operations used by transformers so that float32 results are bitwise equal.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from kvpage.model.config import ModelConfig, RopeConfig
from kvpage.ops.fused import rope_rows

__all__ = ["RotaryEmbedding", "StepRope", "rope_inverse_frequencies"]


class StepRope(NamedTuple):
    """One forward pass's rotary inputs, shared by every layer.

    The Triton kernels read the tables at ``positions`` themselves; the torch
    paths get each token's ``cos``/``sin`` rows ``[T, head_dim]``, gathered
    once per pass instead of once per layer (None when the kernels run).
    """

    positions: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    angles: tuple[torch.Tensor, torch.Tensor] | None


def _default_inverse_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    return 1.0 / (theta**exponents)


def _llama3_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    inv_freq = _default_inverse_frequencies(rope.theta, head_dim)
    assert rope.original_max_position_embeddings is not None  # filled in by parse_rope_config
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / rope.low_freq_factor
    high_freq_wavelen = old_context_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, with a linear ramp between."""
    assert rope.original_max_position_embeddings is not None
    base, factor, original_max = rope.theta, rope.factor, rope.original_max_position_embeddings
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [head_dim // 2] float32, cos/sin multiplier)`` for a rope config."""
    if rope.rope_type in ("default", "dynamic"):
        # Dynamic NTK only changes frequencies past max_position_embeddings,
        # which the position table never reaches.
        return _default_inverse_frequencies(rope.theta, head_dim), 1.0
    if rope.rope_type == "linear":
        return _default_inverse_frequencies(rope.theta, head_dim) / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3_inverse_frequencies(rope, head_dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inverse_frequencies(rope, head_dim)
    raise ValueError(f"rope_type {rope.rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables ``[max_position_embeddings, head_dim]`` in the model dtype."""

    cos_table: torch.Tensor
    sin_table: torch.Tensor

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.max_positions = config.max_position_embeddings
        inv_freq, attention_scaling = rope_inverse_frequencies(config.rope, config.head_dim)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()
        angles = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        # Rounded to the model dtype only after the float32 trigonometry, as transformers does.
        cos = (angles.cos() * attention_scaling).to(dtype)
        sin = (angles.sin() * attention_scaling).to(dtype)
        self.register_buffer("cos_table", cos.to(device), persistent=False)
        self.register_buffer("sin_table", sin.to(device), persistent=False)

    def for_step(self, positions: torch.Tensor, gather: bool) -> StepRope:
        """The pass's :class:`StepRope`; ``gather``: also each token's cos/sin rows (the torch paths)."""
        angles = rope_rows(self.cos_table, self.sin_table, positions) if gather else None
        return StepRope(positions, self.cos_table, self.sin_table, angles)
