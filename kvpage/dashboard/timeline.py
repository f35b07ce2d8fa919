"""A run's frames for the offline page, thinned as they come (pure Python).

``kvpage plan --html`` and ``kvpage bench --html`` offer a frame after every
step; :class:`Timeline` keeps one every ``stride`` steps and, past
:data:`MAX_FRAMES`, drops every other frame and doubles the stride, so a run
of any length ends with between half and all of :data:`MAX_FRAMES` evenly
spread frames.  A frame where the thrashing verdict changes is always
kept, so the onset shows however long the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvpage.dashboard.frame import Frame

MAX_FRAMES = 240


class Timeline:
    def __init__(self, name: str, max_frames: int = MAX_FRAMES) -> None:
        self.name = name
        self.max_frames = max_frames
        self.frames: list[dict[str, Any]] = []
        # Per frame: the offer it came from, and whether thinning must keep it (a change of verdict).
        self._origin: list[tuple[int, bool]] = []
        self.stride = 1
        self._offers = 0
        self._thrashing = False

    def offer(self, is_thrashing: bool, make: Callable[[], Frame]) -> None:
        """A step ended; ``make()`` captures its frame, called only when this one is kept."""
        offer = self._offers
        self._offers += 1
        changed = is_thrashing != self._thrashing
        if offer % self.stride and not changed:
            return
        self._thrashing = is_thrashing
        self.frames.append(make().to_json())
        self._origin.append((offer, changed))
        if len(self.frames) > self.max_frames:
            self.stride *= 2
            keep = [i for i, (at, forced) in enumerate(self._origin) if forced or at % self.stride == 0]
            self.frames = [self.frames[i] for i in keep]
            self._origin = [self._origin[i] for i in keep]
