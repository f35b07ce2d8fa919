"""Vanishing clients, failing requests, failing steps and over-commitment: the server stays up, pages come back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[test]'")
pytest.importorskip("openai", reason="the server tests need the test extra: pip install -e '.[test]'")
import httpx
import openai

from kvpage.server.async_engine import AsyncEngine
from tests.server.live_server import LiveServer, live_server

POISON = 4000  # a token id that makes the request's output processing fail


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server({"max_model_len": 512}) as running:
        yield running


def test_dropped_streams_free_their_pages(server: LiveServer) -> None:
    async def drop_midway(client: httpx.AsyncClient, i: int) -> int:
        body = {"prompt": f"And God said {i}", "max_tokens": 400, "stream": True, "ignore_eos": True}
        received = 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    received += 1
                    if received == 5:
                        break  # the client vanishes mid-stream
        return received

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.root, timeout=60) as client:
            return await asyncio.gather(*(drop_midway(client, i) for i in range(20)))

    assert asyncio.run(run()) == [5] * 20
    engine = server.engine.engine
    assert server.wait_until_idle(timeout=5) == 0
    assert engine.get_metrics()["num_requests_aborted"] >= 20
    assert engine.scheduler.counters.num_generated_tokens < 20 * 400 / 2  # they really stopped early
    ok = httpx.post(server.root + "/v1/completions", json={"prompt": "And God said", "max_tokens": 3})
    assert ok.status_code == 200


def test_a_client_that_gives_up_on_a_whole_answer_aborts_it(server: LiveServer) -> None:
    aborted_before = server.engine.engine.get_metrics()["num_requests_aborted"]
    generated_before = server.engine.engine.scheduler.counters.num_generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.root + "/v1/completions", timeout=0.5,
                   json={"prompt": "And God said", "max_tokens": 480, "ignore_eos": True, "n": 4})
    assert server.wait_until_idle(timeout=5) == 0
    assert server.engine.engine.get_metrics()["num_requests_aborted"] == aborted_before + 1
    assert server.engine.engine.scheduler.counters.num_generated_tokens - generated_before < 4 * 480 / 2


def test_a_failing_request_fails_alone(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    original = AsyncEngine._delta

    def faulty_delta(self: AsyncEngine, output, stream):  # noqa: ANN001
        if POISON in output.prompt_token_ids:
            raise RuntimeError("injected fault")
        return original(self, output, stream)

    monkeypatch.setattr(AsyncEngine, "_delta", faulty_delta)

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        healthy = [client.completions.create(model="kvpage-demo", prompt=f"In the beginning {i}", max_tokens=30,
                                             temperature=0, extra_body={"ignore_eos": True}) for i in range(6)]
        poisoned = client.completions.create(model="kvpage-demo", prompt=[5, POISON, 7], max_tokens=30)
        return await asyncio.gather(*healthy, poisoned, return_exceptions=True)

    *healthy, poisoned = asyncio.run(run())
    assert isinstance(poisoned, openai.InternalServerError) and "injected fault" in str(poisoned)
    assert all(r.usage.completion_tokens == 30 for r in healthy)
    # Streamed, the failure arrives in-band and the stream still ends with [DONE].
    with httpx.stream("POST", server.root + "/v1/completions",
                      json={"prompt": [5, POISON], "max_tokens": 5, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert server.wait_until_idle() == 0


def test_a_failing_step_fails_its_requests_and_the_loop_survives(server: LiveServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    runner = server.engine.engine.runner
    original = runner.launch
    calls = {"n": 0}

    def fail_once(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost (injected)")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "launch", fail_once)
    # ignore_eos: an early EOS would end the request before the failing step.
    failed = httpx.post(server.root + "/v1/completions", timeout=60,
                        json={"prompt": "And God said", "max_tokens": 20, "ignore_eos": True})
    assert failed.status_code == 500 and "device lost" in failed.json()["error"]["message"]
    assert server.wait_until_idle() == 0
    ok = httpx.post(server.root + "/v1/completions", json={"prompt": "And God said", "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_over_commitment_queues_and_preempts_without_failing() -> None:
    # 12 pages of 16 tokens hold about two of these requests at once; 40 arrive together.
    with live_server({"num_kv_blocks": 12, "max_model_len": 128}) as small:
        async def run() -> list:
            client = openai.AsyncOpenAI(base_url=small.base_url, api_key="x", max_retries=0, timeout=300)
            return await asyncio.gather(*(client.completions.create(
                model="kvpage-demo", prompt=f"And the LORD spake unto Moses, saying {i}", max_tokens=60,
                temperature=0, extra_body={"ignore_eos": True}) for i in range(40)))

        responses = asyncio.run(run())
        assert [r.usage.completion_tokens for r in responses] == [60] * 40
        metrics = httpx.get(small.root + "/metrics").text
        preemptions = float(next(line.split()[1] for line in metrics.splitlines()
                                 if line.startswith("kvpage:num_preemptions_total")))
        assert preemptions > 0
        assert small.wait_until_idle() == 0


def test_serve_command_logs_and_stops_gracefully(tmp_path) -> None:  # noqa: ANN001
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "kvpage.cli", "serve", "--port", "0", "--device", "cpu",
                                    "--max-model-len", "64"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "demo-model" in text and "on cpu" in text and "KV cache" in text and "pages of 16 tokens" in text
    assert "serving at http://127.0.0.1:" in text
    assert "engine loop stopped; 0 KV pages in use" in text and "Application shutdown complete" in text
    # uvicorn re-raises the signal it handled once shutdown is complete, so the parent sees it.
    assert process.returncode in (0, -signal.SIGTERM), text


def test_serve_refuses_bad_options() -> None:
    done = subprocess.run([sys.executable, "-m", "kvpage.cli", "serve", "--port", "70000"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 1 and "--port" in done.stderr and "70000" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_binds_loopback_unless_told() -> None:
    from kvpage.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.api_key is None and args.port == 8000
