"""Where thrashing starts, found with as few replays as the exact answer needs (pure Python).

The exhaustive search (:func:`kvpage.plan.sweep.thrashing_onset`) replays
the whole trace once per rate factor and reports the first factor, in the
order given, whose replay thrashes.  :func:`fast_thrashing_onset` gives the
same answer, always, and skips the work that cannot change it:

* **No rate can preempt.**  Thrashing is recomputation after preemption.
  With the paged layout, requests of one sample each, no beam search and
  one priority, the scheduler preempts only when a running sequence's next
  page cannot be had, and at most ``max_num_seqs`` sequences run at once.
  If the KV cache holds the ``max_num_seqs`` largest requests of the trace
  at their full length (plus a page each), no arrival pattern can run it
  short, so no rate thrashes: nothing is replayed.
* **Factor 1 is the base replay**, which the planner has already run.
* **Stop at the answer.**  Factors are tried in order and the search stops
  at the first that thrashes; the ones after it cannot change the answer.
* **A thrashing replay stops early, exactly.**  A replay is causal: until
  request ``k`` arrives, the replay of the first ``k`` requests is the
  replay of them all, step for step.  So a factor is first replayed on a
  prefix of the trace; if that replay starts thrashing before request
  ``k`` would have arrived, the whole trace thrashes, from that same
  instant.  Otherwise a longer prefix is tried (1/32, then 1/8 of the
  trace), then the whole trace, whose replay is the exhaustive one.  A
  factor that does not thrash costs at most 16% more than its replay
  (3% when the first prefix did not preempt at all: then the second is
  not tried).

Only the rows of the factors replayed are reported; a thrashing factor's
row is the figures of the prefix that proved it (``requests_replayed``
says how many requests that was).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any

from kvpage.config import EngineConfig
from kvpage.plan.cost import ModelShape
from kvpage.plan.replay import (
    CostModel,
    ReplayResult,
    ReplaySettings,
    build_scheduler,
    replay,
)
from kvpage.workloads import Workload

# A factor is replayed on the first 1/32 and 1/8 of the trace (prefixes of MIN_PREFIX requests or more)
# before the whole of it: a factor that does not thrash costs at most 16% more than one whole replay (3%
# when the first prefix did not preempt), one that does usually shows it in the first prefix.
PREFIX_SHARES = (32, 8)
MIN_PREFIX = 64


def default_prefixes(num_requests: int) -> tuple[int, ...]:
    """The prefix lengths a factor is replayed on before the whole trace."""
    return tuple(sorted({k for k in (num_requests // share for share in PREFIX_SHARES) if k >= MIN_PREFIX}))


@dataclass
class OnsetSearch:
    """What a thrashing-onset search found, and which rate factors it replayed to find it."""

    rows: list[dict[str, float]]  # one per factor replayed, in the order replayed
    onset_rate: float | None
    method: str  # "fast" or "all"
    factors: list[float]  # the factors asked for
    skipped: list[float] = field(default_factory=list)  # factors not replayed: they could not change the answer
    reason: str = ""  # why they were not

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "factors": self.factors, "evaluated": [r["factor"] for r in self.rows],
                "skipped": self.skipped, "reason": self.reason}


def rate_row(result: ReplayResult, rate: float, factor: float, requests_replayed: int) -> dict[str, float]:
    """The figures the rate sweep reports for one factor's replay."""
    summary = result.summary()
    return {"request_rate": rate, "factor": factor, "thrashing": float(result.thrashing_onset_s is not None),
            "goodput_tokens_per_s": summary["goodput_tokens_per_s"],
            "model_tokens_per_s": summary["model_tokens_per_s"],
            "recompute_share": summary["num_recomputed_tokens"] / max(summary["num_tokens_computed"], 1),
            "num_preemptions": summary["num_preemptions"], "ttft_p99_s": summary["ttft_p99_s"],
            "thrashing_onset_s": summary["thrashing_onset_s"], "requests_replayed": float(requests_replayed)}


def no_rate_can_preempt(workload: Workload, settings: ReplaySettings, model: ModelShape,
                        num_pages: int | None = None) -> str:
    """Why no arrival pattern of this trace can make the replay preempt (a sentence), or "" if one may.

    ``num_pages`` is the KV size in pages when known (a replay's
    ``num_pages``); otherwise it is worked out as the replay does.
    """
    options = dict(settings.options)
    options.setdefault("max_model_len", settings.max_model_len)
    config = EngineConfig.from_kwargs(**options)
    requests = workload.requests
    if config.cache.kv_layout != "paged" or not requests:
        return ""  # a contiguous layout can fail an allocation with room to spare (fragmentation)
    if any(r.n != 1 or r.beam_width for r in requests) or len({r.priority for r in requests}) > 1:
        return ""  # forks and beams hold more sequences than seats; a priority may displace a running request
    if num_pages is None:
        num_pages = build_scheduler(settings, model)[1]
    bs = config.cache.block_size
    max_seqs = config.scheduler.max_num_seqs
    # A request never holds more than the pages of its prompt and output; one more covers a token in flight.
    largest = heapq.nlargest(max_seqs, (-(-(len(r.prompt_token_ids) + r.output_tokens) // bs) + 1 for r in requests))
    needed = sum(largest)
    if needed > num_pages:
        return ""
    return (f"no rate can preempt: the KV cache's {num_pages} pages hold the {len(largest)} largest requests "
            f"(max_num_seqs {max_seqs}) at full length, {needed} pages")


def replay_until_thrashing(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
                           prefixes: tuple[int, ...] | None = None) -> tuple[ReplayResult, int]:
    """The replay's thrashing verdict, exact, from as short a prefix of the trace as proves it.

    Replays the first ``k`` requests for each ``k`` of ``prefixes``
    (default :func:`default_prefixes`), shortest first, then the whole
    trace; a prefix that did not preempt at all ends the probing.  Returns
    the first replay that proves thrashing, a prefix's that thrashed before
    request ``k`` would have arrived (the whole trace's replay thrashes from
    that same instant), or else the whole trace's replay; and how many
    requests it replayed.  Which prefixes are tried changes only the cost,
    never the verdict.
    """
    requests = workload.requests
    n = len(requests)
    for k in sorted(prefixes if prefixes is not None else default_prefixes(n)):
        if not 0 < k < n:
            continue
        try:
            result = replay(replace(workload, requests=requests[:k]), settings, cost, model)
        except RuntimeError:  # a prefix that cannot finish proves nothing; the whole trace decides
            continue
        if result.thrashing_onset_s is not None and result.thrashing_onset_s < requests[k].arrival_time:
            return result, k
        if not result.counters["num_preemptions"]:
            break  # no pressure yet: a longer prefix is unlikely to prove anything, so go for the whole
    return replay(workload, settings, cost, model), n


def scale_rate(workload: Workload, factor: float) -> Workload:
    """The same requests arriving ``factor`` times as fast."""
    requests = tuple(replace(r, arrival_time=r.arrival_time / factor) for r in workload.requests)
    return replace(workload, requests=requests)


def offered_rate(workload: Workload) -> float:
    """Mean arrival rate (requests/s); inf when they all arrive at once."""
    span = workload.requests[-1].arrival_time - workload.requests[0].arrival_time
    return (len(workload.requests) - 1) / span if span > 0 else float("inf")


def fast_thrashing_onset(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
                         factors: tuple[float, ...], base: ReplayResult | None = None,
                         prefixes: tuple[int, ...] | None = None) -> OnsetSearch:
    """The exhaustive search's onset rate, replaying only what it takes; see the module docstring.

    ``base`` is the replay of ``workload`` itself under ``settings`` (factor
    1), when already run; ``prefixes`` the lengths of the prefixes of the
    trace a factor is replayed on before the whole of it (default
    :func:`default_prefixes`).
    """
    base_rate = offered_rate(workload)
    n = len(workload.requests)
    search = OnsetSearch([], None, "fast", list(factors))
    reason = no_rate_can_preempt(workload, settings, model, None if base is None else base.num_pages)
    if reason:
        if base is not None and 1.0 in factors:  # free: report it
            search.rows.append(rate_row(base, base_rate, 1.0, n))
        search.skipped = [f for f in factors if not (base is not None and f == 1.0)]
        search.reason = reason
        return search
    for i, factor in enumerate(factors):
        if factor == 1.0 and base is not None:
            result, replayed = base, n
        else:
            result, replayed = replay_until_thrashing(scale_rate(workload, factor), settings, cost, model,
                                                      prefixes)
        search.rows.append(rate_row(result, base_rate * factor, factor, replayed))
        if result.thrashing_onset_s is not None:
            search.onset_rate = base_rate * factor
            search.skipped = list(factors[i + 1:])
            if search.skipped:
                search.reason = f"thrashing already starts at x{factor:g}"
            break
    return search
