"""The KV cache tensors of one model, on the device and in host swap space.

All layers' K and V caches live in one tensor shaped
``[num_layers * 2, num_pages, block_size, num_kv_heads, head_dim]``; each
layer's ``(key_cache, value_cache)`` pair is a view into it. One tensor lets
a single kernel launch copy a page in every layer (copy-on-write), and lets
a swap move a set of pages of every layer as one gather and one transfer.

Swap space is the same shape with ``num_host_pages`` pages, in host memory
(pinned on a GPU machine, so transfers run at full speed).

An 8-bit cache (``kv_cache_dtype="fp8"``, :mod:`kvpage.kv.format`) stores
values as float8 and keeps their scale bytes in a second tensor shaped
``[num_layers * 2, num_pages, block_size, num_kv_heads]``, indexed by page
the same way, so every page move (copy-on-write, swap) moves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpage.kv.format import KVFormat
from kvpage.ops import CacheScales, LayerKV, copy_pages, wants_kernels
from kvpage.ops.fp8 import as_bytes, format_of, is_fp8
from kvpage.ops.transfer import to_device

__all__ = ["KVCache", "KVCacheShape", "page_bytes"]


def page_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers, K and V together (an 8-bit ``dtype``'s scale bytes included)."""
    kv = format_of(dtype) if is_fp8(dtype) else KVFormat("auto", torch.empty((), dtype=dtype).element_size(), 0)
    return block_size * kv.token_bytes(num_layers, num_kv_heads, head_dim)


@dataclass(frozen=True)
class KVCacheShape:
    """Geometry of the paged KV cache of one model."""

    num_layers: int
    num_pages: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # of the stored values: the model's, or a float8 dtype (then with scale bytes)

    @property
    def bytes_per_page(self) -> int:
        return page_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def scaled(self) -> bool:
        return is_fp8(self.dtype)

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
        # The scale bytes of an 8-bit cache start at 1 (the smallest scale): zeroed pages read back as zeros.
        self.scale_storage = (torch.ones(shape.dims(shape.num_pages)[:-1], dtype=torch.uint8, device=device)
                              if shape.scaled else None)
        self.layers = [LayerKV(self.storage[2 * i], self.storage[2 * i + 1], self._layer_scales(i))
                       for i in range(shape.num_layers)]
        pin = device.type == "cuda"
        self.host_storage = self.host_scales = None
        if num_host_pages:
            self.host_storage = torch.empty(shape.dims(num_host_pages), dtype=shape.dtype, pin_memory=pin)
            if shape.scaled:
                self.host_scales = torch.empty(shape.dims(num_host_pages)[:-1], dtype=torch.uint8, pin_memory=pin)
        self.use_kernels = wants_kernels(backend, self.storage)

    def _layer_scales(self, layer: int) -> CacheScales | None:
        if self.scale_storage is None:
            return None
        return CacheScales(self.scale_storage[2 * layer], self.scale_storage[2 * layer + 1])

    def _device_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by device page, as bytes where 8-bit (torch has no float8 gathers on CPU)."""
        return [as_bytes(self.storage)] + ([self.scale_storage] if self.scale_storage is not None else [])

    def _host_tensors(self) -> list[torch.Tensor]:
        assert self.host_storage is not None, "swapping needs swap space"
        return [as_bytes(self.host_storage)] + ([self.host_scales] if self.host_scales is not None else [])

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: device page ``src`` to ``dst`` in every layer (and its scale bytes)."""
        for tensor in self._device_tensors():
            if self.use_kernels:
                from kvpage.ops import triton_cache

                # [num_caches, num_pages, page_elements]: the view the page-copy kernel takes.
                triton_cache.copy_pages(tensor.view(tensor.shape[0], tensor.shape[1], -1), pairs)
            else:
                copy_pages(list(zip(tensor[0::2], tensor[1::2])), pairs)  # each layer's (K, V)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Device page -> host page, for every layer, as one gather and one transfer per tensor."""
        device_ids = to_device([d for d, _ in pairs], torch.long, self.device)
        host_ids = torch.tensor([h for _, h in pairs], dtype=torch.long)
        for device_tensor, host_tensor in zip(self._device_tensors(), self._host_tensors()):
            # Blocking: the freed device pages may be overwritten by this very step.
            host_tensor[:, host_ids] = device_tensor.index_select(1, device_ids).cpu()

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Host page -> device page, for every layer."""
        host_ids = torch.tensor([h for h, _ in pairs], dtype=torch.long)
        device_ids = to_device([d for _, d in pairs], torch.long, self.device)
        for device_tensor, host_tensor in zip(self._device_tensors(), self._host_tensors()):
            staged = host_tensor.index_select(1, host_ids)
            if self.device.type == "cuda":
                staged = staged.pin_memory()
            device_tensor.index_copy_(1, device_ids, staged.to(self.device, non_blocking=True))
