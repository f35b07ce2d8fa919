"""Which slice of a model one tensor-parallel rank holds (Megatron-style sharding).

* **Attention** is split by heads: rank ``r`` of ``tp`` holds query heads
  ``[r*H/tp, (r+1)*H/tp)`` and the KV heads they read. With ``tp`` up to the
  number of KV heads each rank holds ``KVH/tp`` of them; with more ranks than
  KV heads, ``tp/KVH`` ranks share (replicate) one KV head, so every rank's
  queries still find their keys locally.
* The fused **qkv** and **gate/up** projections are split by output rows
  (column-parallel); **o_proj** and **down_proj** by input columns
  (row-parallel), each rank producing a partial sum that one all-reduce
  completes. So a layer costs two all-reduces and nothing else.
* The **embedding** and **LM head** are split by vocabulary rows, padded to
  a multiple of ``tp``: a lookup outside a rank's rows contributes zeros to
  an all-reduce, and the LM head's logits are gathered.

On one rank (``ModelShard.whole``) every range is the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpage.model.config import ModelConfig
from kvpage.validation import check_tensor_parallel

__all__ = ["ModelShard"]


@dataclass(frozen=True)
class ModelShard:
    """Rank ``rank`` of ``size``'s part of every sharded dimension of one model."""

    rank: int
    size: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    head_start: int  # first query head of this rank
    kv_head_start: int  # first KV head of this rank
    intermediate_start: int
    intermediate_size: int  # MLP rows on this rank
    vocab_start: int
    vocab_rows: int  # embedding / LM head rows on this rank, padding included
    vocab_size: int  # the model's real vocabulary (logits beyond it are padding)

    @classmethod
    def whole(cls, config: ModelConfig) -> ModelShard:
        return cls.of(config, 0, 1)

    @classmethod
    def of(cls, config: ModelConfig, rank: int, size: int) -> ModelShard:
        """The shard of ``rank``; raises ValueError naming the dimension ``size`` cannot split."""
        heads, kv_heads = config.num_attention_heads, config.num_kv_heads
        check_tensor_parallel(size, heads, kv_heads, config.intermediate_size)
        local_kv = max(kv_heads // size, 1)
        # With more ranks than KV heads, ranks r*KVH/tp .. share KV head r // (tp/KVH).
        kv_start = rank * local_kv if kv_heads >= size else rank // (size // kv_heads)
        rows = -(-config.vocab_size // size)
        local_mlp = config.intermediate_size // size
        return cls(rank=rank, size=size, num_heads=heads // size, num_kv_heads=local_kv,
                   head_start=rank * (heads // size), kv_head_start=kv_start,
                   intermediate_start=rank * local_mlp, intermediate_size=local_mlp,
                   vocab_start=rank * rows, vocab_rows=rows, vocab_size=config.vocab_size)

    @property
    def vocab_end(self) -> int:
        """End of this rank's real vocabulary rows (the last rank's padding rows are not loaded)."""
        return min(self.vocab_start + self.vocab_rows, self.vocab_size)
