"""What a GGUF file says about its model, read without torch and without loading a weight.

A GGUF file (llama.cpp's single-file format) holds key-value metadata and
quantized tensors.  Two readers need only the metadata: the planner, which
sizes a deployment from the model's shape and must stay torch-free, and
the model source (:mod:`kvpage.model.source`), which refuses an
architecture kvpage does not run before anything is dequantized and logs
which quantization types the weights come from.

The keys are turned into Hugging Face config names by transformers' own
table (``GGUF_CONFIG_MAPPING``), so the names here are the ones a
``config.json`` would use.  Loading the weights is transformers' job
(:class:`kvpage.model.source.GGUFFile`).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
INSTALL_HINT = "pip install 'kvpage[gguf]' (the gguf and accelerate packages)"


def is_gguf_path(model: str | Path | None) -> bool:
    """Whether ``--model`` names a GGUF file rather than a Hugging Face directory."""
    return model is not None and str(model).lower().endswith(GGUF_SUFFIX)


def require_gguf_support() -> None:
    """Raise a clear error naming the extra to install when the gguf packages are missing."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF file needs {' and '.join(missing)}: {INSTALL_HINT}")


@dataclass(frozen=True)
class GGUFMetadata:
    """The architecture, the config fields and the tensor types of one GGUF file."""

    path: Path
    architecture: str  # general.architecture, e.g. "llama", "qwen2"
    config: dict[str, Any] = field(default_factory=dict)  # Hugging Face config names
    tensor_types: dict[str, int] = field(default_factory=dict)  # quantization type -> number of tensors

    def describe_types(self) -> str:
        """``Q4_1 x210, F32 x61, Q8_0 x1``: the weights' types, most common first."""
        return ", ".join(f"{name} x{count}" for name, count in self.tensor_types.items())


def read_gguf_metadata(path: str | Path) -> GGUFMetadata:
    """Parse ``path``'s metadata (seconds for a large vocabulary: every token string is read)."""
    require_gguf_support()
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model {str(path)!r}: no such GGUF file")
    try:
        reader = GGUFReader(str(file))
    except (ValueError, OSError) as exc:  # not a GGUF file, or a truncated one
        raise ValueError(f"model {str(path)!r} is not a readable GGUF file: {exc}") from None
    fields = reader.fields
    architecture = str(_value(fields["general.architecture"])) if "general.architecture" in fields else ""
    config: dict[str, Any] = {"model_type": architecture}
    mapping: dict[str, dict[str, str | None]] = GGUF_CONFIG_MAPPING  # type: ignore[assignment]  # untyped there
    names = mapping.get(architecture, {})  # GGUF key (after the architecture's prefix) -> config name
    for key, hf_name in names.items():
        reader_field = fields.get(f"{architecture}.{key}")
        if reader_field is not None and hf_name is not None:
            config[hf_name] = _value(reader_field)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in fields:  # its length, not its strings
        config["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    # No output.weight tensor: the LM head is the embedding matrix (transformers decides the same way).
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFMetadata(file, architecture, config, dict(types.most_common()))


def _value(reader_field: Any) -> Any:
    """A metadata field's value: a number, a string, or a list of them."""
    from gguf import GGUFValueType

    parts = [reader_field.parts[i] for i in reader_field.data]
    kind = reader_field.types[-1] if reader_field.types else None
    if kind == GGUFValueType.STRING:
        strings = [bytes(p).decode("utf-8", errors="replace") for p in parts]
        return strings if reader_field.types[0] == GGUFValueType.ARRAY else strings[0]
    numbers = [p.tolist()[0] if hasattr(p, "tolist") else p for p in parts]
    if reader_field.types and reader_field.types[0] == GGUFValueType.ARRAY:
        return numbers
    return numbers[0] if numbers else None
