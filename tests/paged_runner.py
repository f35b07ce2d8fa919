"""A minimal paged driver for a :class:`~kvpage.model.CausalLM`, for tests.

It feeds tokens of several sequences as one flattened step, with K/V in a
paged cache whose physical pages are handed out in shuffled order and whose
unused slots hold NaN, so a wrong slot or page index shows up at once.
"""

from __future__ import annotations

import random

import torch

from kvpage.model import CausalLM
from kvpage.ops import AttentionMetadata, CacheScales, LayerKV

BLOCK_SIZE = 4


class PagedRunner:
    """Drives a model over a paged cache with randomly ordered pages, like an engine step loop."""

    def __init__(self, model: CausalLM, num_pages: int = 96, seed: int = 0,
                 kv_dtype: torch.dtype | None = None) -> None:
        """``kv_dtype``: the pages' dtype (a float8 dtype: 8-bit pages, with their scale bytes); None: the model's."""
        config = model.config
        shape = (num_pages, BLOCK_SIZE, model.shard.num_kv_heads, config.head_dim)  # this rank's KV heads
        self.model = model
        dtype = kv_dtype or model.dtype
        device = model.device

        def layer() -> LayerKV:
            key, value = (torch.full(shape, float("nan"), device=device).to(dtype) for _ in range(2))
            if dtype.itemsize > 1:
                return LayerKV(key, value)
            scales = (torch.ones(shape[:3], dtype=torch.uint8, device=device) for _ in range(2))
            return LayerKV(key, value, CacheScales(*scales))

        self.kv_caches = [layer() for _ in range(config.num_layers)]
        self.free_pages = list(range(num_pages))
        random.Random(seed).shuffle(self.free_pages)
        self.pages: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence's new tokens; returns float32 logits ``[len(new), vocab]`` per sequence."""
        query_lens, seq_lens, page_lists, input_ids = [], [], [], []
        for seq_id, tokens in new_tokens.items():
            pages = self.pages.setdefault(seq_id, [])
            seq_len = self.lengths.get(seq_id, 0) + len(tokens)
            while len(pages) * BLOCK_SIZE < seq_len:
                pages.append(self.free_pages.pop())
            self.lengths[seq_id] = seq_len
            query_lens.append(len(tokens))
            seq_lens.append(seq_len)
            page_lists.append(pages)
            input_ids.extend(tokens)
        device = self.model.device
        meta = AttentionMetadata.build(query_lens, seq_lens, page_lists, BLOCK_SIZE, device=device)
        hidden = self.model(torch.tensor(input_ids, device=device), meta.positions(), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)
        return dict(zip(new_tokens, logits.split(query_lens)))
