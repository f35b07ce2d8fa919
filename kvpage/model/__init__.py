"""Llama-family causal language models that run over the paged KV cache.

``config`` parses Hugging Face ``config.json`` files, ``loader`` builds a
:class:`CausalLM` from a safetensors checkpoint (or from tensors in memory),
``source`` opens what ``--model`` names (a directory or a GGUF file), ``demo_model`` locates the
trained demo model that is the default, and ``random_model`` builds small
random checkpoints for tests and benchmarks.
"""

from kvpage.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig
from kvpage.model.demo_model import demo_model_dir
from kvpage.model.llama import CausalLM
from kvpage.model.loader import load_model, resolve_dtype
from kvpage.model.random_model import random_model_dir

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "ModelConfig",
    "RopeConfig",
    "demo_model_dir",
    "random_model_dir",
    "load_model",
    "resolve_dtype",
]
