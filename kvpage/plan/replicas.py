"""Several identical engines behind a load balancer: the trace dealt round-robin, each share replayed, merged.

This is the other way to spend N devices: N one-device engines (replicas)
rather than one engine of N ranks (tensor parallelism), and ``kvpage plan
--sweep tensor_parallel_size=1,2 replicas=1,2`` sets them side by side at
the same device count. Requests go to the replicas in turn (request ``i``
to replica ``i mod N``), as a round-robin balancer sends them; each
replica's share is replayed on its own, and the results are put together:
every request's timings, the longest replica's duration, the counters and
pages summed, the waste means averaged over the replicas, the earliest
thrashing onset. The time series are the first replica's.
"""

from __future__ import annotations

from kvpage.plan.cost import ModelShape
from kvpage.plan.replay import CostModel, ReplayResult, ReplaySettings, replay
from kvpage.workloads import Workload

__all__ = ["deal", "replay_replicas"]


def deal(workload: Workload, replicas: int) -> list[Workload]:
    """Each replica's requests, dealt in arrival order."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    return [Workload(f"{workload.name} (replica {k + 1} of {replicas})", workload.description,
                     workload.requests[k::replicas]) for k in range(replicas)]


def replay_replicas(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
                    replicas: int) -> ReplayResult:
    """The replay of ``replicas`` engines of ``settings`` sharing ``workload``; one replica is :func:`replay`."""
    if replicas == 1:
        return replay(workload, settings, cost, model)
    results = [replay(share, settings, cost, model) for share in deal(workload, replicas) if share.requests]
    first = results[0]
    onsets = [r.thrashing_onset_s for r in results if r.thrashing_onset_s is not None]
    return ReplayResult(
        settings, f"{first.cost_model}; {replicas} replicas", sum(r.num_pages for r in results), first.block_size,
        first.bytes_per_page, max(r.duration_s for r in results), [t for r in results for t in r.timings],
        {name: sum(r.counters[name] for r in results) for name in first.counters},
        {name: sum(r.waste[name] for r in results) / len(results) for name in first.waste},
        first.series, min(onsets) if onsets else None, max(r.max_recompute_fraction for r in results))
