"""Where a model comes from: a Hugging Face directory or a GGUF file, behind one interface.

``--model`` (or ``LLM(model=...)``) names either

* a **Hugging Face directory**: ``config.json``, safetensors weights, the
  tokenizer files and ``generation_config.json``, read by kvpage's own strict
  loader (:mod:`kvpage.model.loader`); or
* a **GGUF file** (``*.gguf``, llama.cpp's single-file format): metadata,
  tokenizer, chat template and quantized weights in one file.  kvpage runs
  dense weights, so transformers' GGUF loader dequantizes them to the
  engine's dtype (its ``from_pretrained(..., gguf_file=...)``, which needs
  the ``gguf`` extra), and the resulting tensors go through the same strict
  copy as a directory's.  The architecture is checked from the file's
  metadata before anything is dequantized.

Both give a :class:`LoadedModel`: the parsed config, the built model, the
tokenizer (``tokenizer`` overrides where it comes from, as vLLM's
``--tokenizer`` does) and the EOS ids generation stops on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kvpage.gguf_metadata import is_gguf_path, read_gguf_metadata
from kvpage.model.config import ModelConfig, parse_token_ids
from kvpage.model.demo_model import demo_model_dir
from kvpage.model.llama import CausalLM
from kvpage.model.loader import load_model, load_model_from_tensors, resolve_dtype
from kvpage.ops.collectives import TPGroup

__all__ = ["GGUFFile", "HFDirectory", "LoadedModel", "ModelSource", "load_tokenizer", "open_model_source"]

logger = logging.getLogger("kvpage.engine")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    """A model ready to run, with what generation needs from its checkpoint."""

    config: ModelConfig
    model: CausalLM
    dtype: torch.dtype
    tokenizer: Any | None  # a transformers tokenizer; None when the checkpoint ships none
    eos_token_ids: tuple[int, ...]


class ModelSource(Protocol):
    """A place a model can be loaded from."""

    @property
    def path(self) -> Path: ...

    def read_config(self) -> ModelConfig:
        """The model's config alone, without loading weights (checks before anything slow)."""
        ...

    def load(self, dtype: str | torch.dtype, device: torch.device, tokenizer: str | None,
             tp: TPGroup | None = None) -> LoadedModel:
        """Build the model in ``dtype`` ("auto" resolved as :func:`resolve_dtype` does) on ``device``;
        with ``tp``, this rank's shard of it."""
        ...


def open_model_source(model: str | None) -> ModelSource:
    """The source ``--model`` names: None is the built-in demo model's directory."""
    if model is None:
        return HFDirectory(demo_model_dir())
    path = Path(model).expanduser()
    if is_gguf_path(model):
        if not path.is_file():
            raise FileNotFoundError(f"model {model!r}: no such GGUF file")
        return GGUFFile(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {model!r} does not exist (give a Hugging Face directory "
                                "or a .gguf file)")
    return HFDirectory(path)


def load_tokenizer(path: Path, gguf_file: str | None = None) -> Any | None:
    """The tokenizer of a directory (None if it ships none), or of a GGUF file in it."""
    if gguf_file is None and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    # Never run code from a model directory.
    return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file, trust_remote_code=False)


@dataclass(frozen=True)
class HFDirectory:
    """A Hugging Face checkpoint directory."""

    path: Path

    def read_config(self) -> ModelConfig:
        return ModelConfig.from_model_dir(self.path)

    def load(self, dtype: str | torch.dtype, device: torch.device, tokenizer: str | None,
             tp: TPGroup | None = None) -> LoadedModel:
        config = self.read_config()
        model_dtype = resolve_dtype(dtype, config, device)
        model = load_model(self.path, model_dtype, device, tp)
        return LoadedModel(config, model, model_dtype, load_tokenizer(Path(tokenizer) if tokenizer else self.path),
                           read_eos_token_ids(self.path, config))


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file, dequantized by transformers into the engine's dtype."""

    path: Path

    def read_config(self) -> ModelConfig:
        # The metadata's config gets the checks (and the one-line refusals) a directory's config.json gets,
        # before the slow dequantization. Dequantized weights are float32: "auto" is float32 on a CPU and
        # bfloat16 on a GPU.
        return ModelConfig.from_dict({**read_gguf_metadata(self.path).config, "dtype": "float32"})

    def load(self, dtype: str | torch.dtype, device: torch.device, tokenizer: str | None,
             tp: TPGroup | None = None) -> LoadedModel:
        metadata = read_gguf_metadata(self.path)
        early = self.read_config()
        from transformers import AutoModelForCausalLM

        model_dtype = resolve_dtype(dtype, early, device)
        hf_model = AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                        dtype=model_dtype)
        raw = hf_model.config.to_dict()
        raw.pop("quantization_config", None)
        config = ModelConfig.from_dict(raw)
        eos = parse_token_ids(hf_model.generation_config.eos_token_id) or config.eos_token_ids
        model = load_model_from_tensors(config, hf_model.state_dict(), model_dtype, device,
                                        f"GGUF file {str(self.path)!r}", tp)
        del hf_model
        logger.info("dequantized %s (%s: %s) to %s", self.path.name, metadata.architecture,
                    metadata.describe_types(), str(model_dtype).removeprefix("torch."))
        tok = load_tokenizer(Path(tokenizer)) if tokenizer else load_tokenizer(self.path.parent, self.path.name)
        return LoadedModel(config, model, model_dtype, tok, eos)


def read_eos_token_ids(model_dir: Path, config: ModelConfig) -> tuple[int, ...]:
    """EOS ids as generation_config.json gives them (what HF's generate stops on), else config.json's."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        ids = parse_token_ids(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
        if ids:
            return ids
    return config.eos_token_ids
