"""``kvpage serve -tp 2`` as a user runs it: a real process, the official openai client, signals, a killed rank."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[test]'")
pytest.importorskip("openai", reason="the server tests need the test extra: pip install -e '.[test]'")
import openai

from kvpage import LLM, SamplingParams

PROMPT = "And God said"


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A ``kvpage serve -tp 2`` process on the demo model, its URL and its log."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "kvpage.cli", "serve", "-tp", "2", "--port", "0",
                                    "--device", "cpu", "--max-model-len", "512", "--distributed-timeout", "20"],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (match := re.search(r"Uvicorn running on (http://\S+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield process, match.group(1), log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_serve_tp2_answers_the_openai_client_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    expected = LLM(device="cpu", max_model_len=512).generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    with serve(tmp_path) as (process, url, log):
        followers = children(process.pid)
        assert len(followers) == 1 and alive(followers[0])
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        answer = client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == expected  # the same greedy text as one rank
        stream = client.chat.completions.create(model="kvpage-demo", max_tokens=8, stream=True,
                                                messages=[{"role": "user", "content": "Hello"}])
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        text = log.read_text()
        assert "2 ranks from cpu (tensor parallel)" in text
        assert "engine loop stopped; 0 KV pages in use" in text and "Application shutdown complete" in text
        assert process.returncode in (0, -signal.SIGTERM), text
        deadline = time.monotonic() + 10
        while alive(followers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(followers[0]), "the follower rank outlived the server"


def test_a_killed_rank_fails_the_requests_in_flight_and_the_server_exits_non_zero(tmp_path: Path) -> None:
    with serve(tmp_path) as (process, url, log):
        (follower,) = children(process.pid)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        stream = client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=400, stream=True,
                                           temperature=0, extra_body={"ignore_eos": True})
        received = 0
        start = time.monotonic()
        with pytest.raises((openai.APIError, RuntimeError, ValueError)):
            for chunk in stream:
                received += 1
                if received == 3:
                    subprocess.run(["kill", "-9", str(follower)], check=True)
                    start = time.monotonic()
                if "error" in str(chunk):
                    raise RuntimeError(str(chunk))
        assert 3 <= received < 400
        process.wait(60)
        assert time.monotonic() - start < 60
        text = log.read_text()
        assert process.returncode == 1, text
        assert "rank 1" in text and "exited" in text
