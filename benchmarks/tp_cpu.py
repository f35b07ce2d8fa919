"""Tensor parallelism on a CPU: tp = 2 (two gloo processes, a core each) against tp = 1 (one process, both cores).

A random Llama checkpoint large enough that its weights dominate a decode
step (143M parameters, float32: 0.57 GB read a step), a decode-heavy
workload (16 requests, 32-token prompts, 64 greedy tokens each), run in
alternation, tp = 1 then tp = 2, ``--repeats`` times (the machine's speed
drifts). Reports output tokens/s of each and their ratio, whether greedy
outputs agree, and the driver's share of wall time inside collectives
(all-reduce, all-gather, broadcasts; this includes waiting for the slower
rank). Then the planner: each engine calibrated (a small grid) and the
workload replayed, predicted against measured throughput and mean TPOT.

    python benchmarks/tp_cpu.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvpage import LLM, SamplingParams
from kvpage.bench.calibrate import CalibrationGrid, calibrate
from kvpage.bench.trace_run import run_trace
from kvpage.ops.collectives import TPGroup
from kvpage.plan.cost import ModelShape
from kvpage.plan.replay import ReplaySettings, replay
from kvpage.workloads import Workload, WorkloadRequest

SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 4096, "num_attention_heads": 16,
         "num_key_value_heads": 8, "vocab_size": 8192}
REQUESTS, PROMPT, OUTPUT = 16, 32, 64


class CollectiveClock:
    """Wall seconds the driver spends inside TPGroup's collectives (patched on the class, in this process)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("all_reduce", "all_gather", "broadcast", "broadcast_object"):
            original = getattr(TPGroup, name)
            setattr(TPGroup, name, self._timed(original))

    def _timed(self, original: Any) -> Any:
        def timed(group: TPGroup, *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(group, *args)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def build_checkpoint(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(directory, safe_serialization=True)


def prompts() -> list[list[int]]:
    rng = torch.Generator().manual_seed(0)
    return [torch.randint(3, SHAPE["vocab_size"], (PROMPT,), generator=rng).tolist() for _ in range(REQUESTS)]


def timed_run(llm: LLM, clock: CollectiveClock) -> tuple[float, float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    clock.seconds = 0.0
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    wall = time.perf_counter() - start
    return REQUESTS * OUTPUT / wall, clock.seconds / wall, [o.outputs[0].token_ids for o in outputs]


def planner_check(model_dir: Path, tp: int) -> dict[str, float]:
    """Calibrate a tp engine on a small grid, run the workload for real, replay it: predicted / measured."""
    options = {"device": "cpu", "num_kv_blocks": 256, "block_size": 16, "tensor_parallel_size": tp}
    workload = Workload("decode-heavy", "16 x (32 prompt, 64 output) tokens, all at once",
                        tuple(WorkloadRequest(tuple(p), OUTPUT) for p in prompts()))
    llm = LLM(str(model_dir), **options)
    try:
        cost = calibrate(llm, CalibrationGrid(batch_sizes=(1, 4, 16), contexts=(32, 128), decode_steps=8, repeats=1))
    finally:
        llm.shutdown()
    llm = LLM(str(model_dir), **options)  # a fresh engine: its counters are the run's alone
    try:
        real = run_trace(llm, workload).summary()
    finally:
        llm.shutdown()
    settings = ReplaySettings(options={"block_size": 16, "tensor_parallel_size": tp}, kv_tokens=256 * 16,
                              max_model_len=1024, vocab_size=SHAPE["vocab_size"], device_type="cpu")
    model = ModelShape.from_config(model_dir / "config.json", 4)
    planned = replay(workload, settings, cost, model).summary()
    return {"calibration_error": cost.mean_abs_error,
            "throughput_ratio": planned["goodput_tokens_per_s"] / real["goodput_tokens_per_s"],
            "tpot_ratio": planned["tpot_mean_s"] / real["tpot_mean_s"],
            "real_tokens_per_s": real["goodput_tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-143m"
        build_checkpoint(model_dir)
        clock = CollectiveClock()
        one = LLM(str(model_dir), device="cpu", num_kv_blocks=256)
        rates: dict[int, list[float]] = {1: [], 2: []}
        shares: list[float] = []
        same = True
        timed_run(one, clock)  # warm-up
        for _ in range(args.repeats):
            rate, _, expected = timed_run(one, clock)
            rates[1].append(rate)
            two = LLM(str(model_dir), device="cpu", num_kv_blocks=256, tensor_parallel_size=2)
            timed_run(two, clock)  # warm-up
            rate, share, got = timed_run(two, clock)
            two.shutdown()
            rates[2].append(rate)
            shares.append(share)
            same = same and got == expected
        del one
        plans = {tp: planner_check(model_dir, tp) for tp in (1, 2)}
    result = {"python": platform.python_version(), "torch": torch.__version__, "cores": torch.get_num_threads(),
              "tokens_per_s": {tp: statistics.median(v) for tp, v in rates.items()}, "runs": rates,
              "ratio_tp2_over_tp1": statistics.median(rates[2]) / statistics.median(rates[1]),
              "collective_share_tp2": statistics.median(shares), "greedy_equal": same, "planner": plans}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
