"""One frame of the KV page map: the cache, the requests, the signals and the events at one moment (pure Python).

A :class:`Frame` is taken between two steps by :func:`capture`, which only
copies: the page tables and LRU order (:meth:`~kvpage.kv.KVManager.page_map`),
a few numbers per live sequence, the counters and the last events.  Turning
it into the JSON the page draws (:meth:`Frame.to_json`, one character per
page, see :mod:`kvpage.kv.page_map`) happens later, on another thread or
after the run, so the step loop never waits for it.

The live dashboard (:mod:`kvpage.server.dashboard`), ``kvpage plan --html``
and ``kvpage bench --html`` all draw frames made here; the JSON shape is the
contract with ``static/dashboard.js``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kvpage.kv import KVUsage, KVWaste
from kvpage.kv.page_map import PageMap
from kvpage.sched import Scheduler, SequenceStatus
from kvpage.sched.admission import DELAY_RULES
from kvpage.sched.events import DelayEvent, PreemptionEvent
from kvpage.sched.pressure import ThrashingMonitor

PREEMPTIONS_SHOWN = 32
# Waiting sequences listed (oldest first): a queue of thousands would make every frame as large, and the
# page's table as long; the counters still give the whole queue. Running and swapped ones are all listed.
WAITING_SHOWN = 256


@dataclass(frozen=True, slots=True)
class SequenceView:
    seq_id: int
    request_id: str
    status: SequenceStatus
    num_tokens: int
    num_computed_tokens: int
    num_cached_tokens: int  # prompt tokens its admission found in the prefix cache


@dataclass(frozen=True)
class SeriesPoint:
    """The time-series values of one frame: fractions of the cache, counts and rates over the window."""

    time: float
    kv_usage: float
    waste_internal: float
    waste_reservation: float
    waste_external: float
    batch_size: int
    queue_length: int
    preemptions_per_s: float
    evictions_per_s: float
    recompute_fraction: float
    goodput_tokens_per_s: float
    throughput_tokens_per_s: float
    is_thrashing: bool

    @classmethod
    def of(cls, now: float, usage: KVUsage, waste: KVWaste | None, batch_size: int, queue_length: int,
           monitor: ThrashingMonitor) -> SeriesPoint:
        """From the cache's usage, a waste snapshot and a thrashing monitor (the engine's or a replay's)."""
        shares = waste.fractions() if waste is not None else {}
        rates = monitor.rates()
        return cls(now, usage.usage_fraction, shares.get("internal_fragmentation", usage.internal_fragmentation),
                   shares.get("reservation_waste", 0.0), shares.get("external_fragmentation", 0.0), batch_size,
                   queue_length, rates["preemptions_per_s"], rates["evictions_per_s"], rates["recompute_fraction"],
                   rates["goodput_tokens_per_s"], rates["throughput_tokens_per_s"], monitor.is_thrashing)

    def to_json(self) -> dict[str, float]:
        return {"t": round(self.time, 4), "kv_usage": self.kv_usage, "waste_internal": self.waste_internal,
                "waste_reservation": self.waste_reservation, "waste_external": self.waste_external,
                "batch_size": self.batch_size, "queue_length": self.queue_length,
                "preemptions_per_s": self.preemptions_per_s, "evictions_per_s": self.evictions_per_s,
                "recompute_fraction": self.recompute_fraction, "goodput_tokens_per_s": self.goodput_tokens_per_s,
                "throughput_tokens_per_s": self.throughput_tokens_per_s, "is_thrashing": int(self.is_thrashing)}


@dataclass
class Frame:
    """What :func:`capture` copied; :meth:`to_json` makes the page's JSON of it."""

    time: float
    step: int
    layout: str
    pages: PageMap
    sequences: list[SequenceView]
    usage: KVUsage
    num_requests: dict[str, int]  # running, waiting, swapped
    point: SeriesPoint
    preemptions: list[PreemptionEvent]
    delays: list[DelayEvent]
    delay_counts: dict[str, int]
    _encoded: bytes | None = field(default=None, repr=False)
    encode_s: float = 0.0  # what making the JSON took (the live feed budgets its rate by it)

    def to_json(self) -> dict[str, Any]:
        pages = self.pages
        tables, host, copied = pages.tables, pages.host, pages.copied
        sequences = []
        for seq in self.sequences:
            entry: dict[str, Any] = {
                "seq": seq.seq_id, "request": seq.request_id, "status": seq.status.value, "tokens": seq.num_tokens,
                "computed": seq.num_computed_tokens, "cached_tokens": seq.num_cached_tokens,
                "pages": tables.get(seq.seq_id, []), "host": host.get(seq.seq_id, []),
                "copied": copied.get(seq.seq_id, [])}
            spare = pages.spare.get(seq.seq_id)  # contiguous runs held for its samples not forked yet
            if spare:
                entry["spare"] = spare
            sequences.append(entry)
        usage = self.usage
        return {
            "t": round(self.time, 4), "step": self.step, "layout": self.layout, "block_size": pages.block_size,
            "pages": pages.states(), "lru": pages.cached, "host_pages": pages.num_host_pages,
            "sequences": sequences,
            "metrics": {"kv_blocks_used": usage.num_pages_used, "kv_blocks_cached": usage.num_pages_cached_free,
                        "kv_blocks_free": usage.num_pages_free, "kv_blocks_total": usage.num_pages_total,
                        **{f"num_requests_{k}": v for k, v in self.num_requests.items()}},
            "point": self.point.to_json(),
            "events": {
                "preemptions": [{"t": round(e.time, 4), "request": e.request_id, "seq": e.seq_id, "mode": e.mode,
                                 "tokens": e.tokens, "reason": e.reason} for e in self.preemptions],
                "delays": [{"t": round(e.time, 4), "request": e.request_id, "rule": e.rule} for e in self.delays],
                "delay_counts": self.delay_counts},
        }

    def encoded(self) -> bytes:
        """The JSON as bytes, made once however many clients read it."""
        if self._encoded is None:
            start = time.perf_counter()
            self._encoded = json.dumps(self.to_json(), separators=(",", ":")).encode()
            self.encode_s = time.perf_counter() - start
        return self._encoded


def capture(sched: Scheduler, now: float, step: int, waste: KVWaste | None, batch_size: int,
            monitor: ThrashingMonitor) -> Frame:
    """Copy what a frame shows, between two steps (the cost scales with the pages in use, not the cache).

    ``waste`` is the last step's snapshot, ``batch_size`` its sequences, ``monitor`` the run's thrashing monitor.
    """
    life = sched.life
    usage = sched.kv.usage()
    point = SeriesPoint.of(now, usage, waste, batch_size, len(sched.waiting), monitor)
    sequences = [SequenceView(seq.seq_id, seq.request.request_id, seq.status, seq.num_tokens,
                              seq.num_computed_tokens, seq.num_cached_prompt_tokens)
                 for seq in (*sched.running, *sched.swapped, *sched.waiting[:WAITING_SHOWN])]
    num_requests = {name: len({seq.request.request_id for seq in queue}) for name, queue in
                    (("running", sched.running), ("waiting", sched.waiting), ("swapped", sched.swapped))}
    counters = sched.admission.counters
    events = life.events
    return Frame(now, step, sched.kv.layout, sched.kv.page_map(life.min_pending_pages()), sequences,
                 usage, num_requests, point, list(events.preemptions)[-PREEMPTIONS_SHOWN:][::-1],
                 list(events.delays)[-PREEMPTIONS_SHOWN:][::-1],
                 {rule: getattr(counters, rule) for rule in DELAY_RULES})
