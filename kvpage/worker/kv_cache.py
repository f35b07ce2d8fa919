"""The KV cache tensors of one model, on the device and in host swap space.

All layers' K and V caches live in one tensor shaped
``[num_layers * 2, num_pages, block_size, num_kv_heads, head_dim]``; each
layer's ``(key_cache, value_cache)`` pair is a view into it. One tensor lets
a single kernel launch copy a page in every layer (copy-on-write), and lets
a swap move a set of pages of every layer as one gather and one transfer.

Swap space is the same shape with ``num_host_pages`` pages, in host memory
(pinned on a GPU machine, so transfers run at full speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpage.ops import copy_pages, wants_kernels
from kvpage.ops.transfer import to_device

__all__ = ["KVCache", "KVCacheShape", "page_bytes"]


def page_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers, K and V together."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


@dataclass(frozen=True)
class KVCacheShape:
    """Geometry of the paged KV cache of one model."""

    num_layers: int
    num_pages: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        return page_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)

    def dims(self, num_pages: int) -> tuple[int, ...]:
        return (2 * self.num_layers, num_pages, self.block_size, self.num_kv_heads, self.head_dim)


class KVCache:
    """Device pages (and optional host swap pages) of every layer, with the page moves a step needs."""

    def __init__(self, shape: KVCacheShape, device: torch.device, num_host_pages: int = 0,
                 backend: str = "auto") -> None:
        self.shape = shape
        self.device = device
        # Zeroed: a page is read only after it is written, but NaN-free memory keeps bugs visible as wrong
        # tokens rather than silent NaN propagation through masked-out lanes.
        self.storage = torch.zeros(shape.dims(shape.num_pages), dtype=shape.dtype, device=device)
        self.layers = [(self.storage[2 * i], self.storage[2 * i + 1]) for i in range(shape.num_layers)]
        pin = device.type == "cuda"
        self.host_storage = (torch.empty(shape.dims(num_host_pages), dtype=shape.dtype, pin_memory=pin)
                             if num_host_pages else None)
        self.use_kernels = wants_kernels(backend, self.storage)

    def _pages_view(self, storage: torch.Tensor) -> torch.Tensor:
        """``[num_caches, num_pages, page_elements]``: the view the page-copy kernel takes."""
        return storage.view(storage.shape[0], storage.shape[1], -1)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: device page ``src`` to ``dst`` in every layer."""
        if self.use_kernels:
            from kvpage.ops import triton_cache

            triton_cache.copy_pages(self._pages_view(self.storage), pairs)
        else:
            copy_pages(self.layers, pairs)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> host page, for every layer, as one gather and one transfer."""
        assert self.host_storage is not None, "swap_out needs swap space"
        device_ids = to_device([d for d, _ in pairs], torch.long, self.device)
        host_ids = torch.tensor([h for _, h in pairs], dtype=torch.long)
        # Blocking: the freed device pages may be overwritten by this very step.
        self.host_storage[:, host_ids] = self.storage.index_select(1, device_ids).cpu()

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Host page -> device page, for every layer."""
        assert self.host_storage is not None, "swap_in needs swap space"
        host_ids = torch.tensor([h for h, _ in pairs], dtype=torch.long)
        device_ids = to_device([d for _, d in pairs], torch.long, self.device)
        staged = self.host_storage.index_select(1, host_ids)
        if self.device.type == "cuda":
            staged = staged.pin_memory()
        self.storage.index_copy_(1, device_ids, staged.to(self.device, non_blocking=True))
