"""A follower rank: its shard of the model, running every step the driver sends.

A follower builds what the driver builds (:func:`~kvpage.parallel.rank.build_rank`),
then loops: receive a step, perform its page operations on its own KV heads
(copies, swaps: every rank moves its own part of a page), prepare the same
flattened batch and run the forward pass, joining the all-reduces and the
logits' all-gather. It samples nothing: the driver's sampled tokens arrive
by broadcast and serve as the next step's in-flight inputs. It exits on
:class:`~kvpage.parallel.launch.Stop`, or when the driver's connection
closes (the driver died).
"""

from __future__ import annotations

import pickle
import sys

import torch

from kvpage.config import EngineConfig
from kvpage.parallel.launch import RankPlan, Stop, init_group
from kvpage.parallel.rank import build_rank
from kvpage.step_io import SchedulerOutput
from kvpage.worker import LaunchedStep

__all__ = ["follower_main"]


def follower_main(config: EngineConfig, plan: RankPlan) -> None:
    """The whole life of a follower process (the spawn target, or a torchrun rank above 0)."""
    tp = init_group(plan)
    try:
        rank = build_rank(config, tp, torch.device(plan.device))
        runner = rank.runner
        previous: LaunchedStep | None = None
        while True:
            try:
                message = tp.broadcast_object(None)
            except RuntimeError as exc:  # the driver's connection closed: it died, nobody is left to serve
                print(f"kvpage rank {plan.rank}: the driver is gone, exiting ({str(exc).splitlines()[0]})",
                      file=sys.stderr)
                raise SystemExit(1) from None
            if isinstance(message, Stop):
                if message.barrier:
                    torch.distributed.barrier(group=tp.host_group)
                return
            if not isinstance(message, SchedulerOutput):
                raise TypeError(f"rank {plan.rank} got a {type(message).__name__}, not a step")
            previous = runner.launch(message, runner.prepare(message), previous)
    finally:
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the driver may already be gone
            pass


if __name__ == "__main__":  # started by kvpage.parallel.launch, its (config, plan) pickled on stdin
    follower_main(*pickle.loads(sys.stdin.buffer.read()))
