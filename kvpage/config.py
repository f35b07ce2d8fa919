"""Engine configuration: what to load, how big the KV cache is, how to batch.

The ``LLM`` and ``LLMEngine`` constructors take vLLM-style flat keyword
arguments; :meth:`EngineConfig.from_kwargs` routes each to its part and
validates it, so a typo or an out-of-range value fails at construction with a
message naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

GIB = 1 << 30
PREEMPTION_MODES = ("recompute", "swap", "auto")
KV_LAYOUTS = ("paged", "contiguous-request", "contiguous-max")
HEADROOM_POLICIES = ("none", "watermark", "conservative")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LoadConfig:
    """Which model to load, in which dtype, on which device."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    # "auto": the Triton kernels on a GPU, the pure-torch reference on a CPU; "triton" off a GPU
    # needs TRITON_INTERPRET=1 (slow: for tests).
    attention_backend: str = "auto"
    # Run decode steps eagerly instead of replaying captured CUDA graphs.
    enforce_eager: bool = False

    def validate(self) -> None:
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        _require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend", self.attention_backend,
                 f"one of {ATTENTION_BACKENDS}")
        _require(isinstance(self.enforce_eager, bool), "enforce_eager", self.enforce_eager, "True or False")
        _require(self.device in DEVICES or str(self.device).startswith("cuda:"), "device", self.device,
                 f"one of {DEVICES} or 'cuda:N'")
        _require(_is_int(self.seed), "seed", self.seed, "an integer")


@dataclass
class CacheConfig:
    """Size and shape of the paged KV cache.

    Precedence: ``num_kv_blocks`` (exact page count) over ``kv_cache_memory``
    (bytes) over the device default (``gpu_memory_utilization`` on a GPU,
    ``cpu_kv_cache_space`` bytes on a CPU).
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_space: int = 2 * GIB
    enable_prefix_caching: bool = True
    # Host memory for swapped-out pages, in GiB (pinned when the cache is on a GPU); used only
    # with preemption_mode "swap" or "auto".
    swap_space: float = 4.0
    # "paged", or a pre-paging baseline: one contiguous reservation per sequence of
    # prompt + max_tokens ("contiguous-request") or max_model_len ("contiguous-max") tokens.
    kv_layout: str = "paged"

    def validate(self) -> None:
        _require(self.kv_layout in KV_LAYOUTS, "kv_layout", self.kv_layout, f"one of {KV_LAYOUTS}")
        bs = self.block_size
        _require(_is_int(bs) and 1 <= bs <= 256 and bs & (bs - 1) == 0, "block_size", bs,
                 "a power of two from 1 to 256")
        _require(self.num_kv_blocks is None or (_is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1),
                 "num_kv_blocks", self.num_kv_blocks, "None or an integer >= 1")
        _require(self.kv_cache_memory is None or (_is_int(self.kv_cache_memory) and self.kv_cache_memory > 0),
                 "kv_cache_memory", self.kv_cache_memory, "None or a positive number of bytes")
        _require(isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1,
                 "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1]")
        _require(_is_int(self.cpu_kv_cache_space) and self.cpu_kv_cache_space > 0, "cpu_kv_cache_space",
                 self.cpu_kv_cache_space, "a positive number of bytes")
        _require(isinstance(self.swap_space, (int, float)) and not isinstance(self.swap_space, bool)
                 and self.swap_space >= 0, "swap_space", self.swap_space, "a number of GiB >= 0")
        _require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                 self.enable_prefix_caching, "True or False")


@dataclass
class SchedulerConfig:
    """Continuous-batching limits of one step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # None: the model's max_position_embeddings.
    max_model_len: int | None = None
    preemption_mode: str = "recompute"
    # Admission control. A request is admitted only if its pages keep KV use at or
    # below admission_cap (a fraction of the cache; 1.0 = no cap), and under the
    # headroom policy: "watermark" keeps a watermark fraction of pages free for the
    # running requests to grow into; "conservative" sets aside every request's whole
    # prompt + max_tokens, so nothing is ever preempted; "none" admits while pages last.
    admission_cap: float = 1.0
    headroom_policy: str = "watermark"
    watermark: float = 0.01
    # Plan and launch each step while the previous one still runs on the device, so host work hides
    # behind device work. None: on where the device runs asynchronously (CUDA), off on a CPU.
    async_scheduling: bool | None = None

    def validate(self) -> None:
        _require(isinstance(self.admission_cap, (int, float)) and not isinstance(self.admission_cap, bool)
                 and 0 < self.admission_cap <= 1, "admission_cap", self.admission_cap, "a number in (0, 1]")
        _require(self.headroom_policy in HEADROOM_POLICIES, "headroom_policy", self.headroom_policy,
                 f"one of {HEADROOM_POLICIES}")
        _require(isinstance(self.watermark, (int, float)) and not isinstance(self.watermark, bool)
                 and 0 <= self.watermark < 1, "watermark", self.watermark, "a number in [0, 1)")
        _require(_is_int(self.max_num_seqs) and self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs,
                 "an integer >= 1")
        _require(_is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1,
                 "max_num_batched_tokens", self.max_num_batched_tokens, "an integer >= 1")
        _require(self.max_model_len is None or (_is_int(self.max_model_len) and self.max_model_len >= 2),
                 "max_model_len", self.max_model_len, "None or an integer >= 2")
        _require(self.preemption_mode in PREEMPTION_MODES, "preemption_mode", self.preemption_mode,
                 f"one of {PREEMPTION_MODES}")
        _require(self.async_scheduling is None or isinstance(self.async_scheduling, bool), "async_scheduling",
                 self.async_scheduling, "None, True or False")


@dataclass
class EngineConfig:
    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def validate(self) -> None:
        self.load.validate()
        self.cache.validate()
        self.scheduler.validate()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (``block_size=16, max_num_seqs=64, ...``)."""
        parts: dict[str, dict[str, Any]] = {"load": {}, "cache": {}, "scheduler": {}}
        owners = {f.name: part for part, klass in (("load", LoadConfig), ("cache", CacheConfig),
                                                   ("scheduler", SchedulerConfig)) for f in fields(klass)}
        for name, value in kwargs.items():
            if name not in owners:
                raise ValueError(f"unknown engine option {name!r}; known options: {sorted(owners)}")
            parts[owners[name]][name] = value
        config = cls(LoadConfig(**parts["load"]), CacheConfig(**parts["cache"]),
                     SchedulerConfig(**parts["scheduler"]))
        config.validate()
        return config
