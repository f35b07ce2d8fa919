"""Test-wide setup: random test models are built into a per-session temp dir."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the switch is
# read when a kernel is defined, so it must be set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _default_model_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["KVPAGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvpage-cache"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    # The tests run tiny tensors: on a 2-core machine torch's thread pool costs more than it gives.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """SmolLM2-135M-Instruct dequantized once a session: GGUF path, HF directory and transformers oracle."""
    from tests.real_model import build_real_model

    return build_real_model(tmp_path_factory.mktemp("smollm2"))
