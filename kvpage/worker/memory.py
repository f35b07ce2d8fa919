"""How many KV pages fit: explicit sizes, or what the GPU has left after a profiling run.

On a GPU the KV cache gets ``gpu_memory_utilization`` of the device's total
memory, less everything else the engine will need: the weights (already
loaded), memory other processes hold, and the peak *activation* memory of
the largest step the scheduler can schedule. That peak is not guessed: a
profiling run pushes a worst-case batch through the model (a prefill of
``max_num_batched_tokens`` tokens, then logits and sampling for
``max_num_seqs`` rows) and reads the allocator's high-water mark. When decode
steps are replayed from CUDA graphs, the graphs keep a private memory pool,
so the activation peak of a ``max_num_seqs`` decode step is set aside again
for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpage.model import CausalLM
from kvpage.ops import AttentionMetadata

__all__ = ["ActivationProfile", "profile_activations", "size_kv_cache_pages"]

GIB = 1 << 30


@dataclass(frozen=True)
class ActivationProfile:
    """Peak bytes a step needs beyond weights and KV cache."""

    prefill_peak: int  # the largest step: max_num_batched_tokens new tokens, max_num_seqs sampled rows
    decode_peak: int  # a decode step of max_num_seqs sequences (what each CUDA graph's pool holds at most)


def _peak_of_step(model: CausalLM, seq_lens: list[int], num_sampled: int, block_size: int, backend: str,
                  device: torch.device) -> int:
    """Allocator high-water mark of one forward pass plus sampling, minus its scratch KV cache."""
    config = model.config
    page_lists, next_page = [], 0
    for length in seq_lens:
        pages = -(-length // block_size)
        page_lists.append(list(range(next_page, next_page + pages)))
        next_page += pages
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    shape = (2 * config.num_layers, next_page, block_size, config.num_kv_heads, config.head_dim)
    scratch = torch.empty(shape, dtype=model.dtype, device=device)
    scratch_bytes = scratch.numel() * scratch.element_size()
    layers = [(scratch[2 * i], scratch[2 * i + 1]) for i in range(config.num_layers)]
    meta = AttentionMetadata.build(seq_lens, seq_lens, page_lists, block_size, device=device, backend=backend)
    input_ids = torch.zeros(sum(seq_lens), dtype=torch.long, device=device)
    with torch.inference_mode():
        hidden = model(input_ids, meta.positions(), layers, meta)
        logits = model.compute_logits(hidden[:num_sampled])
        # Top-p/top-k sampling sorts the logits: the sampler's largest temporary.
        torch.sort(logits.softmax(dim=-1), dim=-1, descending=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - scratch_bytes
    del scratch, layers, hidden, logits
    torch.cuda.empty_cache()
    return max(peak, 0)


def profile_activations(model: CausalLM, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                        block_size: int, backend: str, device: torch.device) -> ActivationProfile:
    """Run the worst-case prefill and decode steps once with a scratch cache and measure their peaks."""
    lengths, remaining = [], max_num_batched_tokens
    while remaining > 0:
        lengths.append(min(remaining, max_model_len))
        remaining -= lengths[-1]
    prefill = _peak_of_step(model, lengths, min(max_num_seqs, max_num_batched_tokens), block_size, backend, device)
    decode = _peak_of_step(model, [1] * max_num_seqs, max_num_seqs, block_size, backend, device)
    return ActivationProfile(prefill, decode)


def size_kv_cache_pages(*, num_kv_blocks: int | None, kv_cache_memory: int | None, gpu_memory_utilization: float,
                        cpu_kv_cache_space: int, bytes_per_page: int, max_useful_bytes: int, device: torch.device,
                        activations: ActivationProfile | None, uses_graphs: bool) -> int:
    """Number of KV pages: ``num_kv_blocks``, else ``kv_cache_memory`` bytes, else the device default.

    The device default is ``gpu_memory_utilization`` of the GPU less what is
    in use and the profiled activations, or ``cpu_kv_cache_space`` on a CPU;
    in both cases no more than ``max_useful_bytes`` (what ``max_num_seqs``
    sequences of ``max_model_len`` tokens could ever fill), since a tiny
    model would otherwise get millions of pages it can never use.
    """
    if num_kv_blocks is not None:
        return num_kv_blocks
    if kv_cache_memory is not None:
        budget = kv_cache_memory
    elif device.type == "cuda":
        reserve = 0
        if activations is not None:
            reserve = activations.prefill_peak + (activations.decode_peak if uses_graphs else 0)
        budget = min(_gpu_budget(gpu_memory_utilization, reserve, bytes_per_page, device), max_useful_bytes)
    else:
        budget = min(cpu_kv_cache_space, max_useful_bytes)
    num_pages = budget // bytes_per_page
    if num_pages < 1:
        raise ValueError(f"the KV cache budget ({budget} bytes) is smaller than one page ({bytes_per_page} bytes); "
                         "raise kv_cache_memory or gpu_memory_utilization")
    return num_pages


def _gpu_budget(utilization: float, activation_reserve: int, bytes_per_page: int, device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    # Blocks torch's caching allocator holds but no tensor uses are ours to reuse.
    reclaimable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    in_use = total - free - reclaimable
    budget = int(total * utilization) - in_use - activation_reserve
    if budget < bytes_per_page:
        raise ValueError(
            f"gpu_memory_utilization={utilization} allows {total * utilization / GIB:.1f} GiB of the GPU's "
            f"{total / GIB:.1f} GiB, but {in_use / GIB:.1f} GiB are already in use (weights, other engines or "
            f"processes) and the profiled activations need {activation_reserve / GIB:.2f} GiB, leaving no room "
            "for the KV cache; raise gpu_memory_utilization or pass kv_cache_memory / num_kv_blocks")
    return budget
