"""A Llama-family causal language model that runs over a paged KV cache.

One class serves Llama, Mistral, Qwen2 and Qwen3 checkpoints; their
differences are switches in :class:`~kvpage.model.config.ModelConfig`.

The model has no notion of batches or padding.  Each forward pass takes the
flattened new tokens of all scheduled sequences (``[T]`` ids and positions),
the per-layer KV caches and an :class:`~kvpage.ops.AttentionMetadata` that
says which tokens belong to which sequence and where their K/V pages are.
It returns final-normalized hidden states; the caller picks the rows it needs
(usually each sequence's last token) and turns only those into logits with
:meth:`CausalLM.compute_logits`, which avoids a ``[T, vocab]`` projection
during long prefills.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kvpage.model.config import ModelConfig
from kvpage.model.layers import DecoderLayer, RMSNorm, empty_parameter, linear_weight
from kvpage.model.rope import RotaryEmbedding
from kvpage.ops import AttentionMetadata

__all__ = ["CausalLM", "CheckpointSlice"]


class CheckpointSlice(NamedTuple):
    """Where a checkpoint tensor goes: rows ``[row_start, row_start + rows)`` of ``parameter``."""

    parameter: nn.Parameter
    row_start: int
    rows: int


class CausalLM(nn.Module):
    """Decoder-only transformer with tied or separate LM head; inference only."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        # A tied matrix is also the LM head, read whole every step, so it takes the matrix-product layout
        # (linear_weight). Its lookups get slower (SmolLM2, CPU: 12 rows 6 -> 110 us, 2048 rows 6 -> 30 ms)
        # but the LM head of a 12-row decode step got 2x faster (26 -> 12 ms). An untied embedding stays
        # row-major.
        make_embedding = linear_weight if config.tie_word_embeddings else empty_parameter
        self.embed_tokens = make_embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, index, dtype=dtype, device=device) for index in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = (
            self.embed_tokens
            if config.tie_word_embeddings
            else linear_weight(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        )
        self.rotary = RotaryEmbedding(config, dtype, device)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Run new tokens ``[T]`` through all layers; returns hidden states ``[T, hidden]``.

        Each layer writes the new tokens' K/V into ``kv_caches[layer]`` at
        ``meta.slot_mapping`` before attending.
        """
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(
                f"kv_caches has {len(kv_caches)} layers, the model has num_layers={self.config.num_layers}"
            )
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be [T]; got {tuple(input_ids.shape)} and "
                f"{tuple(positions.shape)}"
            )
        hidden = F.embedding(input_ids, self.embed_tokens)
        residual: torch.Tensor | None = None
        rope = self.rotary.for_step(positions, gather=not meta.uses_kernels(hidden))
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        return self.norm(hidden, residual, meta.backend)[0]

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Project hidden states ``[N, hidden]`` to logits ``[N, vocab]``: float32, or in the model dtype."""
        logits = F.linear(hidden, self.lm_head)
        return logits.float() if float32 else logits

    def checkpoint_slices(self) -> dict[str, CheckpointSlice]:
        """Map every Hugging Face weight name this model needs to its destination.

        Fused projections (qkv, gate/up) receive several checkpoint tensors, one
        row block each.
        """
        config = self.config
        slices: dict[str, CheckpointSlice] = {}

        def whole(name: str, parameter: nn.Parameter) -> None:
            slices[name] = CheckpointSlice(parameter, 0, parameter.shape[0])

        def stacked(names: list[str], parameter: nn.Parameter, row_counts: list[int]) -> None:
            row_start = 0
            for name, rows in zip(names, row_counts):
                slices[name] = CheckpointSlice(parameter, row_start, rows)
                row_start += rows

        whole("model.embed_tokens.weight", self.embed_tokens)
        whole("model.norm.weight", self.norm.weight)
        if not config.tie_word_embeddings:
            whole("lm_head.weight", self.lm_head)
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_kv_heads * config.head_dim
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            prefix = f"model.layers.{index}."
            attention, mlp = layer.self_attn, layer.mlp
            whole(prefix + "input_layernorm.weight", layer.input_layernorm.weight)
            whole(prefix + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
            for kind in ("weight", "bias"):
                qkv = getattr(attention.qkv_proj, kind)
                if qkv is not None:
                    names = [prefix + f"self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
                    stacked(names, qkv, [q_rows, kv_rows, kv_rows])
                output = getattr(attention.o_proj, kind)
                if output is not None:
                    whole(prefix + f"self_attn.o_proj.{kind}", output)
                gate_up = getattr(mlp.gate_up_proj, kind)
                if gate_up is not None:
                    names = [prefix + f"mlp.{p}_proj.{kind}" for p in ("gate", "up")]
                    stacked(names, gate_up, [config.intermediate_size] * 2)
                down = getattr(mlp.down_proj, kind)
                if down is not None:
                    whole(prefix + f"mlp.down_proj.{kind}", down)
            if attention.q_norm is not None and attention.k_norm is not None:
                whole(prefix + "self_attn.q_norm.weight", attention.q_norm.weight)
                whole(prefix + "self_attn.k_norm.weight", attention.k_norm.weight)
        return slices
