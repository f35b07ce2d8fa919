"""Fixtures the server tests share: the demo model served on a loopback port, a client, the offline engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kvpage import LLM


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    """The built-in model served in this process (max_model_len 256), one per test module."""
    from tests.server.live_server import live_server  # needs the serve extra; imported by the tests that use it

    with live_server({"max_model_len": 256}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    """The official ``openai`` client of ``server``."""
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline() -> LLM:
    """The same model offline: what the server's answers must equal."""
    return LLM(device="cpu", max_model_len=256)
