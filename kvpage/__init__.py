"""kvpage: an LLM serving engine built around a paged KV cache.

The public API mirrors vLLM's offline one::

    from kvpage import LLM, SamplingParams

    llm = LLM()                                   # built-in demo model
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=16))
    print(out[0].outputs[0].text)

The names below are imported on first use, so that ``import kvpage.kv`` or
``import kvpage.sched`` (pure Python) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "kvpage.llm",
    "LLMEngine": "kvpage.engine",
    "SamplingParams": "kvpage.sampling_params",
    "RequestOutput": "kvpage.outputs",
    "CompletionOutput": "kvpage.outputs",
    "EngineConfig": "kvpage.config",
    "CacheConfig": "kvpage.config",
    "LoadConfig": "kvpage.config",
    "SchedulerConfig": "kvpage.config",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpage' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
