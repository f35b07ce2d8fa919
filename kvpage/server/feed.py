"""Frames of the KV page map for dashboard clients, made on the engine loop only while someone watches.

:class:`DashboardFeed` is called by the engine loop after each step (and
when idle).  With no stream client connected it returns after one integer
comparison: the dashboard costs nothing unwatched.  With clients, it takes
at most :data:`FRAMES_PER_SECOND` frames a second; a frame is a copy
(:func:`kvpage.dashboard.capture`), and its JSON is made once per frame in
the server's event loop thread (:meth:`~kvpage.dashboard.Frame.encoded`),
not in the engine loop.  Both still take the interpreter's time, so the
feed slows down when frames are dear (a large cache, many requests): it
spends at most :data:`COST_SHARE` of the wall time on them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from kvpage.dashboard import Frame
from kvpage.engine import LLMEngine

FRAMES_PER_SECOND = 10
HISTORY_POINTS = 3000  # series points kept for a client that connects later (5 min at 10 Hz)
COST_SHARE = 0.01  # of the wall time, at most, capturing and encoding frames


class DashboardFeed:
    """Frames for stream clients, made on the engine loop while any is connected."""

    def __init__(self, frames_per_second: float = FRAMES_PER_SECOND) -> None:
        self.interval_s = 1.0 / frames_per_second
        self.watchers = 0  # connected stream clients; written in the event loop thread, read by the engine loop
        self.latest: Frame | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._next_time = -1e9
        self._lock = threading.Lock()
        self._wakeups: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ----- engine loop thread -----
    def after_step(self, engine: LLMEngine) -> None:
        """Publish a frame if someone watches and the last one is old enough."""
        if not self.watchers:
            return
        now = engine.uptime()
        if now < self._next_time:
            return
        start = time.perf_counter()
        frame = engine.frame()
        capture_s = time.perf_counter() - start
        encode_s = self.latest.encode_s if self.latest is not None else 0.0
        self._next_time = now + max(self.interval_s, (capture_s + encode_s) / COST_SHARE)
        self.publish(frame)

    def publish(self, frame: Frame) -> None:
        self.latest = frame
        self.history.append(frame.point.to_json())
        with self._lock:
            wakeups = list(self._wakeups)
        for loop, event in wakeups:
            loop.call_soon_threadsafe(event.set)

    # ----- event loop thread -----
    async def frames(self) -> AsyncIterator[Frame]:
        """Every frame published from now on (the latest first, if any), while the caller iterates."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._wakeups.append(entry)
            self.watchers += 1
        try:
            if self.latest is not None:
                yield self.latest
            while True:
                await event.wait()
                event.clear()
                if self.latest is not None:
                    yield self.latest
        finally:
            with self._lock:
                self._wakeups.remove(entry)
                self.watchers -= 1
