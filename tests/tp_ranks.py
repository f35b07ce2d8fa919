"""Run a function on every rank of a real gloo group, in spawned processes, and collect what each returns.

No mock of torch.distributed: each rank is its own process joined through
:func:`kvpage.parallel.launch.init_group`, as an engine's ranks are.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvpage.config import EngineConfig
from kvpage.model import load_model
from kvpage.ops.collectives import TPGroup
from kvpage.parallel.launch import RankPlan, init_group
from kvpage.parallel.rank import build_rank
from tests.paged_runner import PagedRunner


def run_ranks(size: int, work: Callable[..., Any], out_dir: Path, *args: Any) -> list[Any]:
    """``work(tp, *args)`` on ranks 0..size-1; returns each rank's result, in rank order."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(size, port, work, out_dir, args), nprocs=size)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(size)]


def _rank_main(rank: int, size: int, port: int, work: Callable[..., Any], out_dir: Path, args: tuple[Any, ...]) -> None:
    tp = init_group(RankPlan(rank, size, "gloo", f"tcp://127.0.0.1:{port}", 60.0, "cpu", 1))
    try:
        torch.save(work(tp, *args), out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def layer_outputs(tp: TPGroup, model_dir: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """Each sharded layer's output on this rank, and the logits of a paged run, on the same inputs."""
    torch.manual_seed(0)
    model = load_model(model_dir, torch.float32, "cpu", tp)
    hidden = torch.randn(7, model.config.hidden_size)
    layer = model.layers[0]
    ids = torch.tensor([0, 3, model.config.vocab_size - 1, 17, 250])
    runner = PagedRunner(model, seed=tp.rank)  # pages in a different order on each rank: page ids are global
    # Prefill in chunks, then decode: every sequence's logits at every step.
    steps = [{i: p[:3] for i, p in enumerate(prompts)}, {i: p[3:] for i, p in enumerate(prompts)},
             {i: [5] for i in range(len(prompts))}]
    logits = [runner.step(step) for step in steps]
    return {
        "shard": model.shard,
        "qkv_rows": layer.self_attn.qkv_proj.weight.shape[0],
        "embed": model.embed(ids),
        "mlp": layer.mlp(hidden),
        "o_proj": _o_proj_input(model, hidden),
        "logits_of_hidden": model.compute_logits(hidden),
        "paged_logits": logits,
    }


def _o_proj_input(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """o_proj on this rank's columns of one fixed full-width input (the same full input on every rank)."""
    attention = model.layers[0].self_attn
    full = torch.Generator().manual_seed(5)
    width = model.config.num_attention_heads * model.config.head_dim
    whole = torch.randn(hidden.shape[0], width, generator=full)
    start = model.shard.head_start * model.config.head_dim
    return attention.o_proj(whole[:, start : start + attention.q_size].contiguous())


def agreed_pages(tp: TPGroup, model_dir: Path, budgets: list[int]) -> int:
    """The page count this rank's engine build ends with when its own KV budget is ``budgets[rank]``."""
    config = EngineConfig.from_kwargs(model=str(model_dir), device="cpu", kv_cache_memory=budgets[tp.rank])
    return build_rank(config, tp, torch.device("cpu")).cache_shape.num_pages
