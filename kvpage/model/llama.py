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

Built with a :class:`~kvpage.ops.collectives.TPGroup` of several ranks, the
model holds its rank's shard (:mod:`kvpage.model.shard`) and
:meth:`CausalLM.checkpoint_slices` says which part of each checkpoint tensor
that is; every rank then computes the same hidden states and logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kvpage.model.config import ModelConfig
from kvpage.model.layers import DecoderLayer, Linear, RMSNorm, empty_parameter, linear_weight
from kvpage.model.rope import RotaryEmbedding
from kvpage.model.shard import ModelShard
from kvpage.ops import AttentionMetadata, LayerKV
from kvpage.ops.collectives import TPGroup

__all__ = ["CausalLM", "CheckpointSlice"]


class SourcePart(NamedTuple):
    """The part of a checkpoint tensor one rank loads: ``[start, start + length)`` along ``dim`` of ``full``."""

    dim: int
    start: int
    length: int
    full: int


class CheckpointSlice(NamedTuple):
    """Where a checkpoint tensor goes: rows ``[row_start, row_start + rows)`` of ``parameter``.

    ``part`` (tensor parallelism) narrows the checkpoint tensor to this rank's shard first.
    """

    parameter: nn.Parameter
    row_start: int
    rows: int
    part: SourcePart | None = None

    def source_shape(self) -> tuple[int, ...]:
        """The shape the checkpoint tensor must have."""
        shape = [self.rows, *self.parameter.shape[1:]]
        if self.part is not None:
            shape[self.part.dim] = self.part.full
        return tuple(shape)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the checkpoint tensor."""
        part = self.part
        return tensor if part is None else tensor.narrow(part.dim, part.start, part.length)


class CausalLM(nn.Module):
    """Decoder-only transformer with tied or separate LM head; inference only."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TPGroup.single()
        self.shard = shard = ModelShard.of(config, self.tp.rank, self.tp.size)
        # A tied matrix is also the LM head, read whole every step, so it takes the matrix-product layout
        # (linear_weight). Its lookups get slower (SmolLM2, CPU: 12 rows 6 -> 110 us, 2048 rows 6 -> 30 ms)
        # but the LM head of a 12-row decode step got 2x faster (26 -> 12 ms). An untied embedding stays
        # row-major.
        make_embedding = linear_weight if config.tie_word_embeddings else empty_parameter
        self.embed_tokens = make_embedding(shard.vocab_rows, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, index, shard, self.tp, dtype=dtype, device=device)
            for index in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = (
            self.embed_tokens
            if config.tie_word_embeddings
            else linear_weight(shard.vocab_rows, config.hidden_size, dtype=dtype, device=device)
        )
        for matrix in (self.embed_tokens, self.lm_head):  # the last rank's padding rows: zero logits, never read
            matrix.data[shard.vocab_end - shard.vocab_start:].zero_()
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
        kv_caches: Sequence[LayerKV | tuple[torch.Tensor, torch.Tensor]],
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
        hidden = self.embed(input_ids)
        residual: torch.Tensor | None = None
        rope = self.rotary.for_step(positions, gather=not meta.uses_kernels(hidden))
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        return self.norm(hidden, residual, meta.backend)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ``input_ids``; split by vocabulary, each rank looks up its own ids and
        contributes zeros for the others' to one all-reduce."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        local = input_ids - self.shard.vocab_start
        outside = (local < 0) | (local >= self.shard.vocab_rows)
        hidden = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        return self.tp.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0))

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Project hidden states ``[N, hidden]`` to logits ``[N, vocab]``: float32, or in the model dtype.

        Every rank of a tensor-parallel group must call it with the same rows: the logits are gathered.
        """
        logits = F.linear(hidden, self.lm_head)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits)[:, : self.shard.vocab_size]
        return logits.float() if float32 else logits

    def checkpoint_slices(self) -> dict[str, CheckpointSlice]:
        """Map every Hugging Face weight name this model needs to its destination.

        Fused projections (qkv, gate/up) receive several checkpoint tensors, one
        row block each; under tensor parallelism, this rank's rows (or, for the
        row-parallel projections, columns) of each.
        """
        config, shard = self.config, self.shard
        book = _SliceBook(shard.size > 1)
        dim = config.head_dim
        vocab = (shard.vocab_start, shard.vocab_end - shard.vocab_start, config.vocab_size)
        book.stacked(["model.embed_tokens.weight"], self.embed_tokens, [vocab])
        if not config.tie_word_embeddings:
            book.stacked(["lm_head.weight"], self.lm_head, [vocab])
        book.whole("model.norm.weight", self.norm.weight)
        q_part = (shard.head_start * dim, shard.num_heads * dim, config.num_attention_heads * dim)
        kv_part = (shard.kv_head_start * dim, shard.num_kv_heads * dim, config.num_kv_heads * dim)
        mlp_part = (shard.intermediate_start, shard.intermediate_size, config.intermediate_size)
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            prefix = f"model.layers.{index}."
            attention, mlp = layer.self_attn, layer.mlp
            book.whole(prefix + "input_layernorm.weight", layer.input_layernorm.weight)
            book.whole(prefix + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
            for kind in ("weight", "bias"):
                qkv, gate_up = getattr(attention.qkv_proj, kind), getattr(mlp.gate_up_proj, kind)
                if qkv is not None:
                    book.stacked([prefix + f"self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")], qkv,
                                 [q_part, kv_part, kv_part])
                if gate_up is not None:
                    book.stacked([prefix + f"mlp.{p}_proj.{kind}" for p in ("gate", "up")], gate_up,
                                 [mlp_part, mlp_part])
            book.columns(prefix + "self_attn.o_proj", attention.o_proj, q_part)
            book.columns(prefix + "mlp.down_proj", mlp.down_proj, mlp_part)
            if attention.q_norm is not None and attention.k_norm is not None:
                book.whole(prefix + "self_attn.q_norm.weight", attention.q_norm.weight)
                book.whole(prefix + "self_attn.k_norm.weight", attention.k_norm.weight)
        return book.slices


class _SliceBook:
    """The slices of :meth:`CausalLM.checkpoint_slices`, written down by the shape of each kind of weight.

    A part is ``(start, length, full)`` of the sharded dimension; on one rank, parts are not recorded.
    """

    def __init__(self, sharded: bool) -> None:
        self.sharded = sharded
        self.slices: dict[str, CheckpointSlice] = {}

    def whole(self, name: str, parameter: nn.Parameter) -> None:
        self.slices[name] = CheckpointSlice(parameter, 0, parameter.shape[0])

    def stacked(self, names: list[str], parameter: nn.Parameter, parts: list[tuple[int, int, int]]) -> None:
        """A column-parallel (fused) weight: block after block, this rank's rows of each tensor."""
        row_start = 0
        for name, (start, rows, full) in zip(names, parts):
            part = SourcePart(0, start, rows, full) if self.sharded else None
            self.slices[name] = CheckpointSlice(parameter, row_start, rows, part)
            row_start += rows

    def columns(self, prefix: str, linear: Linear, part: tuple[int, int, int]) -> None:
        """A row-parallel linear: this rank's input columns of the weight; the bias (added once, after the
        all-reduce) whole."""
        weight, bias = linear.weight, linear.bias
        start, columns, full = part
        source = SourcePart(1, start, columns, full) if self.sharded else None
        self.slices[prefix + ".weight"] = CheckpointSlice(weight, 0, weight.shape[0], source)
        if bias is not None:
            self.whole(prefix + ".bias", bias)
