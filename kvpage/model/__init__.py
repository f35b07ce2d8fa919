"""Llama-family causal language models that run over the paged KV cache.

``config`` parses Hugging Face ``config.json`` files, ``loader`` builds a
:class:`CausalLM` from a safetensors checkpoint, and ``default_model``
creates the small built-in random checkpoint used when no model is given.
"""

from kvpage.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig
from kvpage.model.default_model import default_model_dir
from kvpage.model.llama import CausalLM
from kvpage.model.loader import load_model, resolve_dtype

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "ModelConfig",
    "RopeConfig",
    "default_model_dir",
    "load_model",
    "resolve_dtype",
]
