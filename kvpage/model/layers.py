"""Building blocks of a Llama-family decoder layer over a paged KV cache.

A decoder layer is ``x + attn(norm(x))`` followed by ``x + mlp(norm(x))``.
The attention block projects q, k and v with one fused matrix, optionally
RMS-normalizes q and k per head (Qwen3), rotates them with RoPE, stores the
new k/v into the paged cache (those three in one fused step) and attends
through the page tables.  The MLP is SiLU-gated with a fused gate/up
matrix. The small per-token steps are :mod:`kvpage.ops.fused` (torch
reference, or one Triton kernel each on a GPU).

Under tensor parallelism a layer holds its rank's shard
(:mod:`kvpage.model.shard`): its heads and MLP rows. The output
projections are :class:`RowParallelLinear`, whose partial sums one
all-reduce completes; on one rank that is a plain ``F.linear``.

Parameters are allocated uninitialized; :mod:`kvpage.model.loader` fills
every one of them from a checkpoint (and checks that none is left out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpage.model.config import ModelConfig
from kvpage.model.rope import StepRope
from kvpage.model.shard import ModelShard
from kvpage.ops import AttentionMetadata, LayerKV, paged_attention
from kvpage.ops.collectives import TPGroup
from kvpage.ops.fused import add_rms_norm, qkv_norm_rope_cache, silu_and_mul

__all__ = ["Attention", "DecoderLayer", "GatedMLP", "Linear", "RMSNorm", "RowParallelLinear", "empty_parameter",
           "linear_weight"]


def empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialized, frozen parameter; the loader is responsible for filling it."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def linear_weight(out_features: int, in_features: int, *, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialized ``[out, in]`` weight for ``F.linear``, laid out for the device's matrix product.

    On a CPU in float32 it is stored input-major (``[in, out]`` in memory, seen
    as ``[out, in]``): ``F.linear`` then hands the BLAS a plain row-major matrix,
    not a transposed one, which is up to 3x faster for the 4-48 rows of a
    decode step (1.3x on the decode-heavy run of ``benchmarks/cpu_vs_vllm.py``).
    In bfloat16 it made no difference, and GPUs are served well either way,
    so those keep the usual layout.
    """
    if device.type == "cpu" and dtype == torch.float32:
        return nn.Parameter(torch.empty(in_features, out_features, dtype=dtype, device=device).t(),
                            requires_grad=False)
    return empty_parameter(out_features, in_features, dtype=dtype, device=device)


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with inference-only, uninitialized parameters."""

    bias: nn.Parameter | None

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.weight = linear_weight(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_parameter(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(Linear):
    """A linear layer split by input columns: each rank's partial product, summed over the group.

    The bias is added once, after the sum. On one rank it is :class:`Linear`.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class RMSNorm(nn.Module):
    """Root-mean-square normalization over the last dimension, computed in float32.

    Called with a ``residual`` it first adds it (the decoder layers' skip
    connection) and returns the sum too, so the add and the norm are one pass.
    """

    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_parameter(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``; without a residual, ``(norm(x), x)``."""
        return add_rms_norm(x, residual, self.weight, self.eps, backend)


class Attention(nn.Module):
    """Grouped-query self-attention that reads and writes the paged KV cache."""

    def __init__(
        self, config: ModelConfig, sliding_window: int | None, shard: ModelShard, tp: TPGroup, *,
        dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.eps = config.rms_norm_eps
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
        self.o_proj = RowParallelLinear(
            self.q_size, config.hidden_size, bias=config.attention_output_bias, tp=tp, dtype=dtype, device=device
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: StepRope,
        kv_cache: LayerKV | tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        key_cache, value_cache, scales = LayerKV(*kv_cache)
        # q/k norms, RoPE and the K/V cache store in one step; q comes out ready for attention.
        query = qkv_norm_rope_cache(
            self.qkv_proj(hidden), rope.positions, rope.cos_table, rope.sin_table,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.eps, key_cache, value_cache, meta.slot_mapping, self.num_heads, meta.backend, rope.angles, scales)
        attended = paged_attention(
            query, key_cache, value_cache, meta, self.scale, sliding_window=self.sliding_window, scales=scales
        )
        return self.o_proj(attended.reshape(num_tokens, self.q_size))


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matrix."""

    def __init__(self, config: ModelConfig, shard: ModelShard, tp: TPGroup, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        rows = shard.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * rows, bias=config.mlp_bias, dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(rows, config.hidden_size, bias=config.mlp_bias, tp=tp, dtype=dtype,
                                           device=device)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), backend))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP.

    The skip connection is carried as a separate ``residual`` so that each
    residual add fuses with the norm that follows it: the layer takes the
    previous layer's output and the running residual (None before the first
    layer) and returns its own pair.
    """

    def __init__(self, config: ModelConfig, layer_index: int, shard: ModelShard, tp: TPGroup, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(
            config, config.sliding_windows[layer_index], shard, tp, dtype=dtype, device=device
        )
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device
        )
        self.mlp = GatedMLP(config, shard, tp, dtype=dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: StepRope,
        kv_cache: LayerKV | tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        backend = meta.backend
        normed, residual = self.input_layernorm(hidden, residual, backend)
        attended = self.self_attn(normed, rope, kv_cache, meta)
        normed, residual = self.post_attention_layernorm(attended, residual, backend)
        return self.mlp(normed, backend), residual
