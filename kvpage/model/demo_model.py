"""The built-in default model: a small trained Llama that ships inside the package.

With no ``model`` given, every entry point (``LLM()``, ``kvpage generate``,
``kvpage serve``, ``kvpage bench``) loads ``kvpage/assets/demo-model/``: an 11M-parameter
``LlamaForCausalLM`` trained on the King James Bible, with a byte-level BPE
tokenizer.  It is an ordinary Hugging Face directory loaded through the same
path as any user checkpoint, so the default exercises the real code, and it
prints readable (if archaic) English.  It is a demo, not an assistant:
``docs/demo-model.md`` tells how it was built.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["demo_model_dir"]


def demo_model_dir() -> Path:
    """Directory of the shipped demo model (package data, present in every install)."""
    directory = Path(str(resources.files("kvpage").joinpath("assets", "demo-model")))
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in demo model is missing from {str(directory)!r}; reinstall kvpage "
            "(the package data kvpage/assets/demo-model/ was not installed) or pass a model directory")
    return directory
