"""Host overhead of decode steps on a GPU: the share of each step's wall time the GPU sits idle.

At batch ``--batch`` (default 256), every request decoding, the engine runs ``--steps`` steps back to
back under ``torch.profiler`` (CUDA activity only, so the profiler adds no host-side cost), with no
synchronization between steps. The GPU's busy time is the union of the intervals of every kernel and
memory copy it ran; host time *not hidden* behind GPU work is the wall time minus that. The engine's own
phase timers split the host side (schedule, prepare, launch and waiting for tokens, update, outputs;
requests ask for final outputs only, as ``LLM.generate`` does). The same steps are first timed without
the profiler, so the figures can be checked against an unprofiled run.

Model: the random Qwen3-0.6B-shaped checkpoint of ``offline_throughput.py`` (bf16). Prompts are random
token ids, lengths uniform in ``[--min-input, --max-input]`` (default [100, 1024], the offline workload's).

    python benchmarks/host_overhead.py [--batch 256] [--steps 30] [--json $OUT/host_overhead.json]
        [--trace $OUT/decode_trace.json] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kvpage, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import build_model, make_workload, qwen3_shape  # noqa: E402

PHASES = ("schedule_s", "prepare_s", "model_s", "update_s", "output_s")


def busy_seconds(events: list[Any]) -> float:
    """Length of the union of the device intervals of ``events`` (kernels and copies), in seconds."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if start >= end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total * 1e-6  # the profiler's times are microseconds


def device_events(profile: Any) -> list[Any]:
    from torch.autograd import DeviceType
    return [e for e in profile.events() if e.device_type == DeviceType.CUDA]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--min-input", type=int, default=100)
    parser.add_argument("--max-input", type=int, default=1024)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--model-dir", type=Path, help="reuse or create the checkpoint here")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled steps here")
    args = parser.parse_args()
    from kvpage import LLM, SamplingParams
    from kvpage.sampling_params import RequestOutputKind

    tmp = None if args.model_dir else tempfile.TemporaryDirectory(prefix="kvpage-qwen3-")
    model_dir = Path(tmp.name) if tmp else args.model_dir
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, qwen3_shape(False, 4096), "cuda")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts, _ = make_workload(args.batch, (args.min_input, args.max_input), (1, 1), vocab)
    llm = LLM(model=str(model_dir), max_num_seqs=args.batch, max_model_len=4096, enforce_eager=args.enforce_eager)
    engine = llm.engine
    # Final outputs only, as LLM.generate asks for them (a streaming server builds cumulative ones).
    params = SamplingParams(temperature=0.6, max_tokens=2048, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    while len(engine.scheduler.running) < args.batch or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    for _ in range(5):  # warm: every sequence decodes from here on
        engine.step()

    def run_steps() -> tuple[float, dict[str, float]]:
        """Wall seconds of ``--steps`` steps back to back (no synchronization between them: with
        asynchronous scheduling a step overlaps the next one's host work), and the mean phase times."""
        before = replace(engine.timings)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        after = engine.timings
        return wall, {p: (getattr(after, p) - getattr(before, p)) / args.steps for p in PHASES}

    plain_wall, plain_phases = run_steps()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled_wall, profiled_phases = run_steps()
    events = device_events(prof)
    if not events:
        raise RuntimeError("the profiler recorded no device activity")
    busy = busy_seconds(events)
    context = statistics.mean(s.num_tokens for s in engine.scheduler.running)
    result = {
        "batch": args.batch, "steps": args.steps, "mean_context_tokens": context,
        "graphs": engine.runner.graphs is not None,
        "async_scheduling": engine.async_scheduling,
        "step_wall_ms": 1e3 * plain_wall / args.steps,
        "profiled_step_wall_ms": 1e3 * profiled_wall / args.steps,
        "gpu_busy_ms_per_step": 1e3 * busy / args.steps,
        "host_not_hidden_ms_per_step": 1e3 * (profiled_wall - busy) / args.steps,
        "host_not_hidden_fraction": 1 - busy / profiled_wall,
        "phases_ms": {p.removesuffix("_s"): 1e3 * v for p, v in plain_phases.items()},
        "profiled_phases_ms": {p.removesuffix("_s"): 1e3 * v for p, v in profiled_phases.items()},
        "top_device_ops": [
            {"name": e.key[:80], "count": e.count, "device_ms_per_step": e.self_device_time_total / 1e3 / args.steps}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:12]],
        "versions": {"torch": torch.__version__, "device": torch.cuda.get_device_name()},
    }
    print(json.dumps(result, indent=1))
    verdict = "PASS" if result["host_not_hidden_fraction"] < 0.10 else "FAIL"
    print(f"target: host time not hidden < 10% of step time: {100 * result['host_not_hidden_fraction']:.1f}% "
          f"{verdict} (step {result['profiled_step_wall_ms']:.2f} ms, GPU busy {result['gpu_busy_ms_per_step']:.2f} ms,"
          f" batch {args.batch}, mean context {context:.0f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    for request_id in list(engine.scheduler.requests):
        engine.abort_request(request_id)
    assert engine.get_metrics()["kv_blocks_used"] == 0
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
