"""The torch side of a step: KV tensors, input preparation, the forward pass, CUDA graphs, sampling."""

from kvpage.worker.kv_cache import KVCache, KVCacheShape, page_bytes
from kvpage.worker.memory import ActivationProfile, profile_activations, size_kv_cache_pages
from kvpage.worker.model_runner import LaunchedStep, ModelRunner, RunnerOptions
from kvpage.worker.sampler import Sampler

__all__ = ["ActivationProfile", "KVCache", "KVCacheShape", "LaunchedStep", "ModelRunner", "RunnerOptions", "Sampler",
           "page_bytes", "profile_activations", "size_kv_cache_pages"]
