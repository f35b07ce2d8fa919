"""What one rank builds: its shard of the model, its KV cache and the runner over them.

The driver (rank 0, the engine) and every follower rank call
:func:`build_rank` with the same configuration, so their collectives meet
in the same order: the activation profile and the CUDA graph captures run
forward passes, whose all-reduces need every rank. The KV page count is
each rank's own budget agreed by a minimum over the group, so no rank ever
holds fewer pages than the scheduler hands out; the swap space likewise.

With one rank this is exactly how the engine was built before tensor
parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpage.config import EngineConfig
from kvpage.kv.format import kv_format
from kvpage.model.source import LoadedModel, open_model_source
from kvpage.ops.collectives import TPGroup
from kvpage.ops.fp8 import check_device, storage_dtype
from kvpage.ops.metadata import resolve_backend
from kvpage.sched.scheduler import num_swap_pages
from kvpage.worker import KVCacheShape, ModelRunner, RunnerOptions, page_bytes, profile_activations, size_kv_cache_pages

__all__ = ["RankModel", "build_rank", "rank_device", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return device


def rank_device(base: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU, or the ``rank``-th GPU from the base device's index."""
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def runner_options(config: EngineConfig) -> RunnerOptions:
    return RunnerOptions(config.load.attention_backend, config.load.enforce_eager)


@dataclass
class RankModel:
    """One rank's model shard, KV cache geometry and runner."""

    loaded: LoadedModel
    device: torch.device
    max_model_len: int
    bytes_per_page: int  # of this rank's KV heads
    cache_shape: KVCacheShape
    num_host_pages: int
    runner: ModelRunner


def build_rank(config: EngineConfig, tp: TPGroup, device: torch.device) -> RankModel:
    """Load this rank's shard and build its runner, agreeing page counts with the other ranks."""
    load, cache, sched = config.load, config.cache, config.scheduler
    source = open_model_source(load.model)  # a Hugging Face directory or a GGUF file
    torch.manual_seed(load.seed)
    loaded = source.load(load.dtype, device, load.tokenizer, tp)
    mc, model = loaded.config, loaded.model
    max_positions = mc.max_position_embeddings
    max_model_len = sched.max_model_len or max_positions
    if max_model_len > max_positions:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's "
                         f"max_position_embeddings ({max_positions})")
    kv_heads = model.shard.num_kv_heads
    options = runner_options(config)
    kv_dtype = storage_dtype(kv_format(cache.kv_cache_dtype, loaded.dtype.itemsize), loaded.dtype)
    check_device(cache.kv_cache_dtype, kv_dtype, device, resolve_backend(options.attention_backend, device) == "triton")
    per_page = page_bytes(mc.num_layers, cache.block_size, kv_heads, mc.head_dim, kv_dtype)
    explicit = cache.num_kv_blocks is not None or cache.kv_cache_memory is not None
    activations = None
    if device.type == "cuda" and not explicit:
        activations = profile_activations(model, sched.max_num_batched_tokens, sched.max_num_seqs, max_model_len,
                                          cache.block_size, options.attention_backend, device)
    pages_per_seq = -(-max_model_len // cache.block_size)
    num_pages = tp.min_int(size_kv_cache_pages(
        num_kv_blocks=cache.num_kv_blocks, kv_cache_memory=cache.kv_cache_memory,
        gpu_memory_utilization=cache.gpu_memory_utilization, cpu_kv_cache_space=cache.cpu_kv_cache_space,
        bytes_per_page=per_page, max_useful_bytes=sched.max_num_seqs * pages_per_seq * per_page,
        device=device, activations=activations, uses_graphs=options.captures_graphs(device)))
    num_host_pages = tp.min_int(num_swap_pages(cache, sched, per_page))
    shape = KVCacheShape(mc.num_layers, num_pages, cache.block_size, kv_heads, mc.head_dim, kv_dtype)
    runner = ModelRunner(model, shape, device, load.seed, loaded.eos_token_ids, max_num_seqs=sched.max_num_seqs,
                         max_pages_per_seq=pages_per_seq, num_host_pages=num_host_pages, options=options)
    return RankModel(loaded, device, max_model_len, per_page, shape, num_host_pages, runner)
