"""The engine's modes, declared as types (pure Python, imports nothing).

Every option that picks one behaviour out of a few is a ``Literal`` alias
here, so a type checker rejects a misspelt mode where it is written, and
the run-time validation (:mod:`kvpage.validation`) takes its allowed values
from the same alias with :func:`typing.get_args`: the list of modes is
written once.
"""

from __future__ import annotations

from typing import Literal, get_args

# How the KV memory is handed out: pages on demand, or one contiguous reservation per sequence of
# prompt + max_tokens ("contiguous-request") or max_model_len ("contiguous-max") tokens.
KVLayout = Literal["paged", "contiguous-request", "contiguous-max"]
# How much admission keeps free for running sequences to grow into (see kvpage.sched.admission).
HeadroomPolicy = Literal["none", "watermark", "conservative"]
# What a preempted sequence loses: its K/V, recomputed later, or nothing, its pages copied to host memory.
PreemptionMode = Literal["recompute", "swap", "auto"]
# Which attention (and fused-step) code the runner calls: "torch" is the reference (the spec), "sdpa" the fast
# torch path over scaled_dot_product_attention, "triton" the kernels; "auto" is "triton" on CUDA, else "sdpa".
AttentionPath = Literal["torch", "sdpa", "triton"]
AttentionBackend = Literal["auto", "torch", "sdpa", "triton"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
# How K/V is stored in the pages: in the model's dtype ("auto"), or in 8 bits with a scale per token and KV head
# ("fp8" is "fp8_e4m3": more mantissa; "fp8_e5m2": more range). See kvpage.kv.format.
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
# The digest of the prefix cache's chained page keys (see kvpage.kv.prefix_hash).
PrefixHash = Literal["sha256", "builtin"]

# The torch.distributed backend between tensor-parallel ranks: NCCL between GPUs, gloo between CPU processes.
DistributedBackend = Literal["auto", "nccl", "gloo"]

KV_LAYOUTS: tuple[KVLayout, ...] = get_args(KVLayout)
HEADROOM_POLICIES: tuple[HeadroomPolicy, ...] = get_args(HeadroomPolicy)
PREEMPTION_MODES: tuple[PreemptionMode, ...] = get_args(PreemptionMode)
ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = get_args(AttentionBackend)
ATTENTION_PATHS: tuple[AttentionPath, ...] = get_args(AttentionPath)
DTYPES: tuple[DType, ...] = get_args(DType)
KV_CACHE_DTYPES: tuple[KVCacheDtype, ...] = get_args(KVCacheDtype)
PREFIX_HASHES: tuple[PrefixHash, ...] = get_args(PrefixHash)
DISTRIBUTED_BACKENDS: tuple[DistributedBackend, ...] = get_args(DistributedBackend)
