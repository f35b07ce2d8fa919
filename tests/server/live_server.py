"""Run the real app under uvicorn on a free loopback port, in a thread of the test process.

In-process, so tests can read the engine's page counts directly and inject
faults; everything a client sees still goes over real HTTP.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from kvpage.server.async_engine import AsyncEngine
from kvpage.server.launch import ServeOptions, build_app


@dataclass
class LiveServer:
    root: str  # http://127.0.0.1:PORT
    engine: AsyncEngine
    model_name: str

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    def pages_in_use(self) -> int:
        return self.engine.engine.kv.usage().num_pages_used

    def wait_until_idle(self, timeout: float = 10.0) -> int:
        """Pages in use once no request is left (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.engine.engine.has_unfinished_requests() and self.pages_in_use() == 0:
                break
            time.sleep(0.02)
        return self.pages_in_use()


@contextmanager
def live_server(engine_options: dict[str, Any] | None = None, **serve_options: Any) -> Iterator[LiveServer]:
    options = ServeOptions(**serve_options)
    app, engine = build_app({"model": None, "device": "cpu", **(engine_options or {})}, options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", engine, options.served_model_name or "kvpage-demo")
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()
        sock.close()
