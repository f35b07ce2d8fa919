"""Test-wide setup: the built-in default model is built into a per-session temp dir."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _default_model_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["KVPAGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvpage-cache"))
