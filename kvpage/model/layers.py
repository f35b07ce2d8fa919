"""Building blocks of a Llama-family decoder layer over a paged KV cache.

A decoder layer is ``x + attn(norm(x))`` followed by ``x + mlp(norm(x))``.
The attention block projects q, k and v with one fused matrix, optionally
RMS-normalizes q and k per head (Qwen3), rotates them with RoPE, stores the
new k/v into the paged cache and attends through the block tables.  The MLP
is SiLU-gated with a fused gate/up matrix.

Parameters are allocated uninitialized; :mod:`kvpage.model.loader` fills
every one of them from a checkpoint (and checks that none is left out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpage.model.config import ModelConfig
from kvpage.model.rope import apply_rotary
from kvpage.ops import AttentionMetadata, paged_attention, write_kv_cache

__all__ = ["Attention", "DecoderLayer", "GatedMLP", "Linear", "RMSNorm", "empty_parameter"]


def empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialized, frozen parameter; the loader is responsible for filling it."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with inference-only, uninitialized parameters."""

    bias: nn.Parameter | None

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.weight = empty_parameter(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_parameter(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square normalization over the last dimension, computed in float32."""

    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_parameter(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        # The weight multiplies after rounding back, matching transformers' numerics.
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(input_dtype)


class Attention(nn.Module):
    """Grouped-query self-attention that reads and writes the paged KV cache."""

    def __init__(
        self, config: ModelConfig, sliding_window: int | None, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.sliding_window = sliding_window
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            self.q_size + 2 * self.kv_size,
            bias=config.attention_bias,
            dtype=dtype,
            device=device,
        )
        self.o_proj = Linear(
            self.q_size, config.hidden_size, bias=config.attention_output_bias, dtype=dtype, device=device
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, key, value = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.reshape(num_tokens, self.num_heads, self.head_dim)
        key = key.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            query = self.q_norm(query)
            key = self.k_norm(key)
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)

        key_cache, value_cache = kv_cache
        write_kv_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        attended = paged_attention(
            query, key_cache, value_cache, meta, self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(attended.reshape(num_tokens, self.q_size))


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matrix."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias, dtype=dtype, device=device
        )
        self.down_proj = Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, config: ModelConfig, layer_index: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(
            config, config.sliding_windows[layer_index], dtype=dtype, device=device
        )
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device
        )
        self.mlp = GatedMLP(config, dtype=dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))
