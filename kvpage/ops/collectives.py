"""Tensor parallelism's collectives, and which part of a tensor each rank holds.

A tensor-parallel engine runs one process per device, its *rank*; together
they are the *group*. Each rank holds a shard of every weight and of the KV
cache's heads, and the model calls three collectives:

* ``all_reduce`` sums partial outputs: after attention's output projection
  and after the MLP's down projection (each rank multiplies its own slice of
  the inner dimension), and after the vocabulary-parallel embedding;
* ``all_gather`` puts the vocabulary-parallel LM head's logits together;
* ``broadcast`` hands the driver's sampled tokens to the other ranks, which
  read them as the next step's in-flight inputs (asynchronous scheduling).

:class:`TPGroup` is the one object behind them. ``TPGroup.single()`` (one
rank, the default everywhere) makes every collective the identity without
touching ``torch.distributed``, so the one-device path runs exactly the code
it ran before tensor parallelism existed. The processes, the rendezvous and
the step messages are :mod:`kvpage.parallel`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TPGroup", "shard_range"]


def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s equal part of ``total`` items (``size`` must divide it)."""
    if total % size:
        raise ValueError(f"{total} items cannot be split evenly over {size} ranks")
    part = total // size
    return rank * part, (rank + 1) * part


@dataclass(frozen=True)
class TPGroup:
    """This process's rank in its tensor-parallel group, and the collectives over the group.

    ``device_group`` runs the tensor collectives (NCCL between GPUs, gloo on
    CPUs); ``host_group`` (always gloo) carries the driver's step messages and
    small integers such as the agreed page count.
    """

    rank: int = 0
    size: int = 1
    device_group: Any = None
    host_group: Any = None

    @classmethod
    def single(cls) -> TPGroup:
        return cls()

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and answers; the others follow its step messages."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (the identity on one rank)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``[..., n]`` tensor side by side along the last dimension, in rank order."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The driver's ``tensor`` on every rank, in place."""
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src=0, group=self.device_group)
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value``: what all of them can honour (page counts)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        holder = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(holder, op=dist.ReduceOp.MIN, group=self.host_group)
        return int(holder.item())

    def broadcast_object(self, message: object) -> object:
        """The driver's ``message`` (any picklable object) on every rank; the others pass None."""
        if self.size == 1:
            return message
        import torch.distributed as dist

        holder = [message]
        dist.broadcast_object_list(holder, src=0, group=self.host_group)
        return holder[0]
