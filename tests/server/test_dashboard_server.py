"""The dashboard's routes over real HTTP: the key, the snapshot, the stream's rate, and no cost unwatched."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.live_server import LiveServer, live_server

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DATA_ROUTES = ("/dashboard/api/snapshot", "/dashboard/api/stream", "/dashboard/api/requests/anything")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server({"max_model_len": 256, "num_kv_blocks": 24}, api_key=KEY) as running:
        yield running


def test_data_routes_need_the_key_and_the_page_does_not(server: LiveServer) -> None:
    with httpx.Client(base_url=server.root, timeout=30) as http:
        page = http.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/dashboard/static/dashboard.js" in page.text
        assert http.get("/dashboard/static/dashboard.js").status_code == 200
        assert http.get("/dashboard/static/secret.py").status_code == 404
        for route in DATA_ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                refused = http.get(route, headers=headers)
                assert refused.status_code == 401, route
                assert refused.json()["error"]["code"] == "invalid_api_key"
                assert "frame" not in refused.text
        assert http.get("/dashboard/api/snapshot", headers=AUTH).status_code == 200
        missing = http.get("/dashboard/api/requests/nope", headers=AUTH)
        assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def _load(server: LiveServer, count: int, max_tokens: int) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120) as http:
            for i in range(count):
                http.post("/completions", json={"prompt": f"Tell story {i} " * 3, "max_tokens": max_tokens,
                                                "ignore_eos": True})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_no_frame_is_made_while_nobody_watches(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.engine.engine
    made = []
    real = engine.frame
    monkeypatch.setattr(engine, "frame", lambda: made.append(1) or real())
    steps = engine.timings.num_steps
    _load(server, 2, 40).join()
    assert engine.timings.num_steps > steps + 40
    assert made == []  # and the engine loop checked one integer a step: DashboardFeed.after_step


def test_stream_sends_frames_at_most_ten_a_second(server: LiveServer) -> None:
    load = _load(server, 3, 120)
    frames: list[dict[str, Any]] = []
    with httpx.Client(base_url=server.root, timeout=60) as http:
        with http.stream("GET", "/dashboard/api/stream", headers=AUTH) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    frames.append(json.loads(line[len("data: "):]))
                    if len(frames) == 12:
                        break
        assert server.engine.feed.watchers in (0, 1)  # the stream's end is seen when the server next writes
        snapshot = http.get("/dashboard/api/snapshot", headers=AUTH).json()
    load.join()
    times = [f["t"] for f in frames[1:]]  # the first is the state at connection
    assert all(b - a >= 0.099 for a, b in zip(times, times[1:])), times
    assert [f["step"] for f in frames] == sorted(f["step"] for f in frames)
    assert any(f["sequences"] for f in frames)
    assert len(snapshot["series"]) >= 11 and snapshot["series"][-1]["t"] >= times[-1]
    deadline = time.monotonic() + 5
    while server.engine.feed.watchers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.feed.watchers == 0
    assert server.wait_until_idle() == 0


def test_request_details_give_prompt_and_text(server: LiveServer) -> None:
    with httpx.Client(base_url=server.root, timeout=60) as http:
        load = _load(server, 1, 200)
        deadline = time.monotonic() + 30
        rid = None
        while rid is None and time.monotonic() < deadline:
            frame = http.get("/dashboard/api/snapshot", headers=AUTH).json()["frame"]
            running = [s for s in frame["sequences"] if s["status"] == "running" and s["tokens"] > 12]
            rid = running[0]["request"] if running else None
        assert rid is not None
        details = http.get(f"/dashboard/api/requests/{rid}", headers=AUTH).json()
        load.join()
    assert details["request"] == rid and details["prompt"].startswith("Tell story 0")
    tokenizer = server.engine.engine.tokenizer
    assert details["sequences"] and details["sequences"][0]["token_ids"]
    for seq in details["sequences"]:
        assert seq["text"] == tokenizer.decode(seq["token_ids"])
