"""The ranks of a tensor-parallel engine: started, told each step, checked, stopped.

The engine's process is rank 0, the *driver*: it alone schedules, keeps the
KV manager and samples. :func:`start_ranks` starts ``tp - 1`` *follower*
processes (spawned, one per device), or, under ``torchrun``, joins the
group its environment describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``, ``LOCAL_RANK``), where the processes of ranks above 0 turn
into followers inside the engine's constructor and exit when the driver
stops: the same script runs unchanged on one host or several.

Followers are plain ``python -m kvpage.parallel.follower`` processes that
read their configuration from stdin, so a user's script needs no
``if __name__ == "__main__"`` guard (multiprocessing's spawn would import it
again in every child).

Every step's :class:`~kvpage.step_io.SchedulerOutput` goes to the followers
once, as one object broadcast over a gloo group (:meth:`Ranks.send`); each
follower then prepares and runs the same step on its shard
(:mod:`kvpage.parallel.follower`). A follower waits for its next message without a
time limit, since a server may stay idle for hours; everything else (the
driver's sends, the tensor collectives inside a step) times out after
``distributed_timeout``.

Faults end the engine rather than hang it. Before each step the driver
checks that every follower process is alive, and any error of a step
(a collective's timeout, a peer's closed connection) becomes a
:class:`RankFailure` naming the ranks that died. After one, the engine
refuses further steps; the server fails its requests and exits non-zero.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from kvpage.config import EngineConfig
from kvpage.ops.collectives import TPGroup
from kvpage.validation import check_tensor_parallel

__all__ = ["RankFailure", "RankPlan", "Ranks", "Stop", "init_group", "start_ranks"]

T = TypeVar("T")
# Step messages wait as long as the server idles; a year is torch's "forever".
MESSAGE_TIMEOUT = datetime.timedelta(days=365)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, hung past the timeout or failed: the engine cannot go on."""


@dataclass(frozen=True)
class Stop:
    """The driver's last message: followers leave their loop and exit.

    With ``barrier`` (torchrun's group, whose processes the driver cannot
    wait for) every rank meets once more before leaving the group, so that
    no rank tears its connections down while another still uses them.
    """

    barrier: bool = False


@dataclass(frozen=True)
class RankPlan:
    """How one rank joins the group."""

    rank: int
    size: int
    backend: str  # "nccl" or "gloo"
    init_method: str  # "tcp://host:port", or "env://" under torchrun
    timeout_s: float
    device: str
    threads: int  # torch intra-op threads of this rank (the CPU's cores shared out)


def backend_for(config: EngineConfig, device: torch.device) -> str:
    """The torch.distributed backend: the configured one, checked against the device."""
    requested = config.parallel.distributed_backend
    if requested == "nccl" and device.type != "cuda":
        raise ValueError(f"distributed_backend='nccl' needs CUDA devices, but the engine runs on {device.type!r}; "
                         "use 'gloo' or 'auto'")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return requested


def init_group(plan: RankPlan) -> TPGroup:
    """Join the process group; the tensor collectives time out, the step messages do not."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine is already running in this process; call its shutdown() "
                           "before starting another")
    torch.set_num_threads(plan.threads)
    timeout = datetime.timedelta(seconds=plan.timeout_s)
    device_id = torch.device(plan.device) if plan.backend == "nccl" else None
    dist.init_process_group(plan.backend, init_method=plan.init_method, rank=plan.rank, world_size=plan.size,
                            timeout=timeout, device_id=device_id)
    # A timeout is each process's own: the followers wait for the next step as long as the server idles, the
    # driver gives a follower that does not take its message the collectives' time.
    host_group = dist.new_group(backend="gloo", timeout=timeout if plan.rank == 0 else MESSAGE_TIMEOUT)
    return TPGroup(plan.rank, plan.size, device_group=None, host_group=host_group)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _threads_per_rank(size: int, device: torch.device) -> int:
    """CPU ranks share the cores; GPU ranks keep torch's default."""
    if device.type == "cuda":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // size)


def start_ranks(config: EngineConfig, base: torch.device) -> Ranks | None:
    """Start (or, under torchrun, join) the group of a ``tensor_parallel_size`` > 1 engine; None for one rank.

    Checks what can be checked before any process starts: the model's heads divide, the devices exist.
    """
    from kvpage.model.source import open_model_source
    from kvpage.parallel.rank import rank_device

    size = config.parallel.tensor_parallel_size
    backend = backend_for(config, base)
    if size == 1:
        return None
    mc = open_model_source(config.load.model).read_config()
    check_tensor_parallel(size, mc.num_attention_heads, mc.num_kv_heads, mc.intermediate_size)
    if base.type == "cuda":
        present = torch.cuda.device_count()
        if (base.index or 0) + size > present:
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs from {base}, but {present} are present")
    torchrun = all(name in os.environ for name in _TORCHRUN_VARS)
    threads = _threads_per_rank(size, base)
    if torchrun:
        return _join_torchrun(config, base, size, backend, threads)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    plans = [RankPlan(rank, size, backend, init_method, config.parallel.distributed_timeout,
                      str(rank_device(base, rank)), threads) for rank in range(size)]
    processes = [_spawn(config, plan) for plan in plans[1:]]
    restore = torch.get_num_threads()
    try:
        tp = init_group(plans[0])
    except BaseException:
        for process in processes:
            process.kill()
        torch.set_num_threads(restore)
        raise
    return Ranks(tp, processes, restore)


def _spawn(config: EngineConfig, plan: RankPlan) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads)}
    process = subprocess.Popen([sys.executable, "-m", "kvpage.parallel.follower"], stdin=subprocess.PIPE, env=env)
    assert process.stdin is not None
    process.stdin.write(pickle.dumps((config, plan)))
    process.stdin.close()
    return process


def _join_torchrun(config: EngineConfig, base: torch.device, size: int, backend: str, threads: int) -> Ranks:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != size:
        raise ValueError(f"tensor_parallel_size={size} but torchrun started WORLD_SIZE={world} processes")
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if base.type == "cuda" else base
    plan = RankPlan(rank, size, backend, "env://", config.parallel.distributed_timeout, str(device), threads)
    if rank != 0:
        from kvpage.parallel.follower import follower_main

        follower_main(config, plan)
        raise SystemExit(0)  # a follower's work ends with the driver's
    restore = torch.get_num_threads()
    return Ranks(init_group(plan), [], restore, torchrun=True)


class Ranks:
    """The driver's side of the group: the follower processes, the step messages, failure and shutdown."""

    def __init__(self, tp: TPGroup, processes: list[subprocess.Popen[bytes]], restore_threads: int,
                 torchrun: bool = False) -> None:
        self.tp = tp
        self.processes = processes
        self.torchrun = torchrun  # torchrun's group: its processes are not this one's to wait for
        self.restore_threads = restore_threads
        self.failure: RankFailure | None = None
        self._stopped = False
        atexit.register(self.shutdown)

    def dead(self) -> list[str]:
        """The followers whose process has ended, as 'rank N (pid P, exit code C)'."""
        return [f"rank {rank} (pid {p.pid}, exit code {p.returncode})"
                for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]

    def send(self, message: object) -> None:
        """Hand one message (a step, or :class:`Stop`) to every follower."""
        if self.failure is not None:
            raise self.failure
        if self.dead():
            raise RankFailure(f"tensor-parallel {', '.join(self.dead())} exited")
        self.tp.broadcast_object(message)

    def guard(self, work: Callable[[], T]) -> T:
        """Run a step's work; any error becomes the engine's one :class:`RankFailure`."""
        if self.failure is not None:
            raise self.failure
        try:
            return work()
        except RankFailure as exc:
            self.failure = exc
            raise
        except Exception as exc:
            dead = self.dead()
            why = f"{', '.join(dead)} exited" if dead else f"{type(exc).__name__}: {exc}"
            self.failure = RankFailure(f"tensor-parallel step failed: {why}")
            raise self.failure from exc

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Tell the followers to stop, wait for them (then kill what is left), leave the group."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        import torch.distributed as dist

        if self.failure is None and not self.dead():
            try:
                self.tp.broadcast_object(Stop(barrier=self.torchrun))
                if self.torchrun:
                    dist.barrier(group=self.tp.host_group)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        for process in self.processes:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if dist.is_initialized():
            # A failed group may not shut down cleanly (a peer is gone); abandoning it is all that is left.
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        if not self.torchrun:  # (torchrun's processes end with their engine: nothing to restore for)
            torch.set_num_threads(self.restore_threads)
