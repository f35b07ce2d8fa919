"""The scheduler's event log: the last preemptions and admission delays, for people to read (pure Python).

Counters say how many requests were preempted or delayed; when the cache
starts to thrash an operator asks *which* ones, how much work each lost and
why.  :class:`EventLog` keeps the last :data:`EVENTS_KEPT` of each kind in
bounded deques.  An entry is made only when the event happens (a
preemption, or the first time a rule holds a request back), never per step,
so a quiet engine pays nothing for it.

Time stamps come from the log's ``clock``: the engine's wall clock, or the
planner's virtual clock in a replay.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

EVENTS_KEPT = 64
PreemptionMode = Literal["recompute", "swap"]


@dataclass(frozen=True, slots=True)
class PreemptionEvent:
    """A running sequence gave its pages back."""

    time: float
    request_id: str
    seq_id: int
    mode: PreemptionMode
    tokens: int  # K/V tokens lost (recompute: to be computed again) or moved to host memory (swap)
    reason: str  # what needed the pages


@dataclass(frozen=True, slots=True)
class DelayEvent:
    """An admission rule first held a waiting request back."""

    time: float
    request_id: str
    rule: str


@dataclass
class EventLog:
    """The last preemptions and admission delays, newest last."""

    clock: Callable[[], float] = time.monotonic
    preemptions: deque[PreemptionEvent] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    delays: deque[DelayEvent] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))

    def preempted(self, request_id: str, seq_id: int, mode: PreemptionMode, tokens: int, reason: str) -> None:
        self.preemptions.append(PreemptionEvent(self.clock(), request_id, seq_id, mode, tokens, reason))

    def delayed(self, request_id: str, rule: str) -> None:
        self.delays.append(DelayEvent(self.clock(), request_id, rule))
