"""Tensor parallelism: one engine over several devices, on torch.distributed.

One scheduler and one KV manager, both in the engine's process (rank 0, the
driver). Every rank holds its shard of the weights and of the KV heads
(:mod:`kvpage.model.shard`) and its own KV pages under the same page ids:
page tables are global, so the scheduler's decisions hold on every rank.

* :mod:`~kvpage.parallel.rank`: what each rank builds (the same on all, so
  the collectives meet), with the page count agreed by a minimum;
* :mod:`~kvpage.parallel.launch`: starting the follower processes (or
  joining torchrun's), the per-step message, failures and shutdown;
* :mod:`~kvpage.parallel.follower`: a follower's loop.

The collectives themselves are :class:`kvpage.ops.collectives.TPGroup`.
"""

from kvpage.parallel.launch import RankFailure, Ranks, start_ranks
from kvpage.parallel.rank import RankModel, build_rank, rank_device, resolve_device, runner_options

__all__ = ["RankFailure", "RankModel", "Ranks", "build_rank", "rank_device", "resolve_device", "runner_options",
           "start_ranks"]
