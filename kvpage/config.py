"""Engine configuration: what to load, how big the KV cache is, how to batch.

The ``LLM`` and ``LLMEngine`` constructors take vLLM-style flat keyword
arguments; :meth:`EngineConfig.from_kwargs` routes each to its part and
validates it, so a typo or an out-of-range value fails at construction with a
message naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kvpage.modes import (
    ATTENTION_BACKENDS,
    DISTRIBUTED_BACKENDS,
    DTYPES,
    HEADROOM_POLICIES,
    KV_CACHE_DTYPES,
    KV_LAYOUTS,
    PREEMPTION_MODES,
    PREFIX_HASHES,
    AttentionBackend,
    DistributedBackend,
    DType,
    HeadroomPolicy,
    KVCacheDtype,
    KVLayout,
    PreemptionMode,
    PrefixHash,
)
from kvpage.validation import is_int, is_number, one_of, require

__all__ = [
    "ATTENTION_BACKENDS", "DEVICES", "DTYPES", "GIB", "HEADROOM_POLICIES", "KV_LAYOUTS", "PREEMPTION_MODES",
    "CacheConfig", "EngineConfig", "LoadConfig", "ParallelConfig", "SchedulerConfig",
]

GIB = 1 << 30
# Not a mode of kvpage.modes: a device may also be "cuda:N".
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LoadConfig:
    """Which model to load, in which dtype, on which device."""

    model: str | None = None
    """Directory of the model's Hugging Face checkpoint; None: the bundled demo model."""
    tokenizer: str | None = None
    """Where to load the tokenizer from; None: from ``model``."""
    dtype: DType = "auto"
    """Dtype of the weights and the KV cache; "auto": float32 on a CPU, the checkpoint's half precision on a
    GPU (bfloat16 for a float32 checkpoint)."""
    device: str = "auto"
    """"cpu", "cuda" or "cuda:N"; "auto": a GPU if there is one, else the CPU."""
    seed: int = 0
    """Seed of the engine's random generators."""
    attention_backend: AttentionBackend = "auto"
    """"auto": the Triton kernels on a GPU, "sdpa" (torch's scaled_dot_product_attention over gathered key
    slots, kvpage.ops.sdpa_attention) on a CPU; "torch": the pure-torch reference, the numerical spec;
    "triton" off a GPU needs TRITON_INTERPRET=1 (slow: for tests)."""
    enforce_eager: bool = False
    """Run decode steps eagerly instead of replaying captured CUDA graphs."""

    def validate(self) -> None:
        one_of("dtype", self.dtype, DTYPES)
        one_of("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        require(isinstance(self.enforce_eager, bool), "enforce_eager", self.enforce_eager, "True or False")
        require(self.device in DEVICES or str(self.device).startswith("cuda:"), "device", self.device,
                f"one of {DEVICES} or 'cuda:N'")
        require(is_int(self.seed), "seed", self.seed, "an integer")


@dataclass
class CacheConfig:
    """Size and shape of the paged KV cache.

    Precedence: ``num_kv_blocks`` (exact page count) over ``kv_cache_memory``
    (bytes) over the device default (``gpu_memory_utilization`` on a GPU,
    ``cpu_kv_cache_space`` bytes on a CPU).
    """

    block_size: int = 16
    """Token slots per KV page: a power of two from 1 to 256."""
    num_kv_blocks: int | None = None
    """Exact number of KV pages; None: sized from ``kv_cache_memory`` or the device default."""
    kv_cache_memory: int | None = None
    """Bytes of KV cache; None: the device default."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's total memory the engine may fill; the KV cache gets what the weights, other
    processes and the activation peak leave of it."""
    cpu_kv_cache_space: int = 2 * GIB
    """Bytes of KV cache on a CPU."""
    enable_prefix_caching: bool = True
    """Share the pages of common prompt prefixes between requests, by content hash."""
    prefix_caching_hash_algo: PrefixHash = "sha256"
    """The digest of the chained page keys: "sha256", or "builtin" (Python's 64-bit hash, about 3x cheaper a
    page; the planner's default: see kvpage.kv.prefix_hash)."""
    swap_space: float = 4.0
    """Host memory for swapped-out pages, in GiB (pinned when the cache is on a GPU); used only with
    preemption_mode "swap" or "auto"."""
    kv_cache_dtype: KVCacheDtype = "auto"
    """How K/V is stored: "auto" (the model's dtype), or "fp8" (= "fp8_e4m3") / "fp8_e5m2": 8 bits a value plus
    one scale byte per token and KV head, computed as K/V is stored (no calibration). See kvpage.kv.format."""
    kv_layout: KVLayout = "paged"
    """"paged", or a pre-paging baseline: one contiguous reservation per sequence of prompt + max_tokens
    ("contiguous-request") or max_model_len ("contiguous-max") tokens."""

    def validate(self) -> None:
        one_of("kv_layout", self.kv_layout, KV_LAYOUTS)
        one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        bs = self.block_size
        require(is_int(bs) and 1 <= bs <= 256 and bs & (bs - 1) == 0, "block_size", bs,
                "a power of two from 1 to 256")
        require(self.num_kv_blocks is None or (is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1),
                "num_kv_blocks", self.num_kv_blocks, "None or an integer >= 1")
        require(self.kv_cache_memory is None or (is_int(self.kv_cache_memory) and self.kv_cache_memory > 0),
                "kv_cache_memory", self.kv_cache_memory, "None or a positive number of bytes")
        require(isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1,
                "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1]")
        require(is_int(self.cpu_kv_cache_space) and self.cpu_kv_cache_space > 0, "cpu_kv_cache_space",
                self.cpu_kv_cache_space, "a positive number of bytes")
        require(is_number(self.swap_space) and self.swap_space >= 0, "swap_space", self.swap_space,
                "a number of GiB >= 0")
        require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                self.enable_prefix_caching, "True or False")
        one_of("prefix_caching_hash_algo", self.prefix_caching_hash_algo, PREFIX_HASHES)


@dataclass
class SchedulerConfig:
    """Continuous-batching limits of one step."""

    max_num_seqs: int = 256
    """Most sequences in one step's batch."""
    max_num_batched_tokens: int = 8192
    """Most tokens (prefill chunks plus decodes) in one step's batch."""
    max_model_len: int | None = None
    """Longest prompt + output of a sequence; None: the model's max_position_embeddings."""
    preemption_mode: PreemptionMode = "recompute"
    """What a preempted sequence loses: its K/V, recomputed later ("recompute"), or nothing, its pages
    copied to host memory ("swap"); "auto" picks, victim by victim, whichever is cheaper."""
    admission_cap: float = 1.0
    """Admission control: a request is admitted only if its pages keep KV use at or below this fraction
    of the cache (1.0 = no cap), and under ``headroom_policy``."""
    headroom_policy: HeadroomPolicy = "watermark"
    """"watermark" keeps a ``watermark`` fraction of pages free for the running requests to grow into;
    "conservative" sets aside every request's whole prompt + max_tokens, so nothing is ever preempted;
    "none" admits while pages last."""
    watermark: float = 0.01
    """Fraction of the pages the "watermark" headroom policy keeps free."""
    async_scheduling: bool | None = None
    """Schedule and launch each step while the previous one still runs on the device, so host work hides
    behind device work. None: on where the device runs asynchronously (CUDA), off on a CPU."""

    def validate(self) -> None:
        require(is_number(self.admission_cap) and 0 < self.admission_cap <= 1, "admission_cap",
                self.admission_cap, "a number in (0, 1]")
        one_of("headroom_policy", self.headroom_policy, HEADROOM_POLICIES)
        require(is_number(self.watermark) and 0 <= self.watermark < 1, "watermark", self.watermark,
                "a number in [0, 1)")
        require(is_int(self.max_num_seqs) and self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs,
                "an integer >= 1")
        require(is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1,
                "max_num_batched_tokens", self.max_num_batched_tokens, "an integer >= 1")
        require(self.max_model_len is None or (is_int(self.max_model_len) and self.max_model_len >= 2),
                "max_model_len", self.max_model_len, "None or an integer >= 2")
        one_of("preemption_mode", self.preemption_mode, PREEMPTION_MODES)
        require(self.async_scheduling is None or isinstance(self.async_scheduling, bool), "async_scheduling",
                self.async_scheduling, "None, True or False")


@dataclass
class ParallelConfig:
    """Tensor parallelism: one engine over several devices (kvpage.parallel)."""

    tensor_parallel_size: int = 1
    """Ranks the model and its KV heads are split over, one process and one device each (GPUs cuda:0..N-1,
    or CPU processes); the engine starts the other ranks' processes itself, or joins torchrun's."""
    distributed_backend: DistributedBackend = "auto"
    """torch.distributed backend between ranks: "nccl" (GPUs), "gloo" (CPUs); "auto": NCCL on CUDA, else gloo."""
    distributed_timeout: float = 300.0
    """Seconds a collective may wait for the other ranks before the engine fails with an error."""

    def validate(self) -> None:
        tp = self.tensor_parallel_size
        require(is_int(tp) and tp >= 1, "tensor_parallel_size", tp, "an integer >= 1")
        one_of("distributed_backend", self.distributed_backend, DISTRIBUTED_BACKENDS)
        require(is_number(self.distributed_timeout) and self.distributed_timeout > 0, "distributed_timeout",
                self.distributed_timeout, "a positive number of seconds")


@dataclass
class EngineConfig:
    """The whole engine's configuration, in its four parts."""

    load: LoadConfig = field(default_factory=LoadConfig)
    """What to load and where."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The KV cache."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The batching of each step."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor parallelism."""

    def validate(self) -> None:
        self.load.validate()
        self.cache.validate()
        self.scheduler.validate()
        self.parallel.validate()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (``block_size=16, max_num_seqs=64, ...``)."""
        parts: dict[str, dict[str, Any]] = {"load": {}, "cache": {}, "scheduler": {}, "parallel": {}}
        owners = {f.name: part for part, klass in (("load", LoadConfig), ("cache", CacheConfig),
                                                   ("scheduler", SchedulerConfig), ("parallel", ParallelConfig))
                  for f in fields(klass)}
        for name, value in kwargs.items():
            if name not in owners:
                raise ValueError(f"unknown engine option {name!r}; known options: {sorted(owners)}")
            parts[owners[name]][name] = value
        config = cls(LoadConfig(**parts["load"]), CacheConfig(**parts["cache"]),
                     SchedulerConfig(**parts["scheduler"]), ParallelConfig(**parts["parallel"]))
        config.validate()
        return config
