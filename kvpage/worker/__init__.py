"""The torch side of a step: KV tensors, input preparation, the forward pass, sampling."""

from kvpage.worker.model_runner import (
    KVCacheShape,
    ModelRunner,
    allocate_kv_cache,
    page_bytes,
)
from kvpage.worker.sampler import Sampler

__all__ = ["KVCacheShape", "ModelRunner", "Sampler", "allocate_kv_cache", "page_bytes"]
