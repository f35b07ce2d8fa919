"""Engine overhead per step, outside the model, against the number of running requests.

For each batch size N, N requests with distinct prompts of ``--context`` tokens
are prefilled, then the engine runs ``--steps`` pure decode steps. The engine
times each phase of a step (schedule: planning and page bookkeeping; prepare:
building the input tensors; update: applying sampled tokens, stop checks,
page commits, outputs); their sum is the overhead, everything but the forward
pass and sampling; building the ``RequestOutput`` objects is timed apart.
A tiny random model keeps the forward pass short, which
does not change the overhead being measured.

    python benchmarks/step_overhead.py [--batch-sizes 1,16,64,128,256] [--context 256] [--steps 30]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from kvpage import LLM, SamplingParams
from kvpage.model.random_model import RANDOM_MODEL_SPEC, build_random_model

PHASES = ("schedule_s", "prepare_s", "update_s")
MAX_MODEL_LEN = 4096


def tiny_model(directory: Path) -> Path:
    spec = replace(RANDOM_MODEL_SPEC, name="bench-tiny", num_layers=1, hidden_size=64, intermediate_size=128,
                   num_heads=2, num_kv_heads=1, max_position_embeddings=MAX_MODEL_LEN)
    directory.mkdir(parents=True, exist_ok=True)
    build_random_model(directory, spec)
    return directory


def measure(model_dir: Path, batch: int, context: int, steps: int, block_size: int) -> dict[str, float]:
    llm = LLM(model=str(model_dir), block_size=block_size, max_num_seqs=max(batch, 1),
              num_kv_blocks=batch * ((context + steps + 8) // block_size + 2) + MAX_MODEL_LEN // block_size,
              max_num_batched_tokens=16384)
    engine = llm.engine
    rng = random.Random(batch)
    # CUMULATIVE outputs, as a streaming server would ask for: the worst case for output building.
    # max_tokens leaves room for the prefill steps: nobody may finish before all are decoding.
    params = SamplingParams(temperature=0, max_tokens=MAX_MODEL_LEN - context, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": [rng.randrange(0, 256) for _ in range(context)]}, params)
    while len(engine.scheduler.running) < batch or engine.scheduler.running[-1].num_output_tokens == 0:
        assert engine.has_unfinished_requests()
        engine.step()
    assert not engine.scheduler.waiting and engine.get_metrics()["num_preemptions"] == 0
    per_step: dict[str, list[float]] = {phase: [] for phase in (*PHASES, "overhead_s", "model_s", "output_s")}
    for _ in range(steps):
        before = replace(engine.timings)
        engine.step()
        after = engine.timings
        for phase in (*PHASES, "model_s", "output_s"):
            per_step[phase].append(getattr(after, phase) - getattr(before, phase))
        per_step["overhead_s"].append(sum(getattr(after, p) - getattr(before, p) for p in PHASES))
    return {phase: statistics.median(values) * 1e3 for phase, values in per_step.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16,64,128,256")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
          f", {torch.get_num_threads()} threads; context {args.context}, block {args.block_size}, "
          f"median of {args.steps} decode steps")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp) / "tiny")
        print("| running requests | schedule ms | prepare ms | update ms | overhead ms | overhead µs / request "
              "| outputs ms | model ms |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = measure(model_dir, batch, args.context, args.steps, args.block_size)
            print(f"| {batch} | {r['schedule_s']:.3f} | {r['prepare_s']:.3f} | {r['update_s']:.3f} | "
                  f"{r['overhead_s']:.3f} | {1e3 * r['overhead_s'] / batch:.1f} | {r['output_s']:.3f} | "
                  f"{r['model_s']:.2f} |")


if __name__ == "__main__":
    main()
