"""``kvpage plan``: the command line of the planner (no torch is imported)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kvpage.config import KV_LAYOUTS
from kvpage.dashboard import Timeline, write_offline_page
from kvpage.gguf_metadata import is_gguf_path, read_gguf_metadata
from kvpage.modes import KV_CACHE_DTYPES, KVLayout
from kvpage.plan.cost import HARDWARE, LINKS, CalibratedCostModel, Link, ModelShape, PhysicsCostModel
from kvpage.plan.onset import OnsetSearch, fast_thrashing_onset
from kvpage.plan.replay import REPLAY_PREFIX_HASH, CostModel, ReplaySettings, replay
from kvpage.plan.report import PlanReport, table, to_json, write_report
from kvpage.plan.sweep import (
    apply_setting,
    layout_savings,
    offered_rate,
    parse_bytes,
    parse_slo,
    parse_sweep,
    run_sweep,
    thrashing_onset,
)
from kvpage.plan.trace import TraceLimits, load_trace, synthetic_trace
from kvpage.workloads import WORKLOAD_NAMES, Workload

ENGINE_FLAGS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "admission_cap", "headroom_policy",
                "watermark", "preemption_mode", "swap_space", "kv_layout", "enable_prefix_caching",
                "prefix_caching_hash_algo", "async_scheduling", "tensor_parallel_size", "kv_cache_dtype")


def add_plan_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = commands.add_parser("plan", help="replay a traffic trace through the scheduler to size a deployment")
    plan.add_argument("trace", nargs="?", help="JSONL trace, one request a line (or --synthetic)")
    plan.add_argument("--synthetic", choices=WORKLOAD_NAMES, help="generate a seeded synthetic trace instead")
    plan.add_argument("--rate", type=float, default=None, help="synthetic: mean request rate (default: all at once)")
    plan.add_argument("--num", type=int, default=1000, help="synthetic: number of requests")
    plan.add_argument("--burstiness", type=float, default=1.0, help="synthetic: gamma shape; 1 = Poisson, < 1 burstier")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--model", default=None, help="Hugging Face model directory (its config.json) or .gguf file (its "
                      "metadata); default: the demo model")
    plan.add_argument("--max-model-len", type=int, default=None)
    plan.add_argument("--hardware", default="h100", choices=sorted(HARDWARE), help="physics cost model preset")
    plan.add_argument("--cost-model", default=None, help="calibration JSON from kvpage bench --calibrate")
    plan.add_argument("--dtype-bytes", type=int, default=None, help="bytes per weight, and per K/V value with "
                      "--kv-cache-dtype auto (default: 2 on GPU presets, 4 on cpu)")
    size = plan.add_argument_group("KV size (one of)")
    size.add_argument("--kv-memory", default=None, help="KV cache memory, e.g. 8GiB (default 8GiB)")
    size.add_argument("--kv-tokens", type=int, default=None, help="KV cache size in token slots")
    engine = plan.add_argument_group("engine settings (as for kvpage serve)")
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192)
    engine.add_argument("--admission-cap", type=float, default=1.0)
    engine.add_argument("--headroom-policy", default="watermark")
    engine.add_argument("--watermark", type=float, default=0.01)
    engine.add_argument("--preemption-mode", default="recompute")
    engine.add_argument("--swap-space", type=float, default=4.0)
    engine.add_argument("--kv-layout", default="paged")
    engine.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    engine.add_argument("--prefix-caching-hash-algo", default=REPLAY_PREFIX_HASH,
                        help="builtin | sha256 (the engine's default; the same replay, bar a 64-bit collision)")
    engine.add_argument("--async-scheduling", dest="async_scheduling", action="store_true", default=None,
                        help="replay the engine's asynchronous step order (its default on a GPU) exactly; "
                             "no decode fast-forward, so about 2.5x slower (default: the order of the engine "
                             "--cost-model was measured on, else synchronous)")
    engine.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    engine.add_argument("-tp", "--tensor-parallel-size", type=int, default=None,
                        help="ranks the model and its KV heads are split over; --kv-memory is each rank's "
                             "(default: the --cost-model engine's, else 1)")
    engine.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                        help="auto (the model dtype) or an 8-bit format: pages hold about twice the tokens, and "
                             "the step-time model reads their bytes (default: the --cost-model engine's, else auto)")
    plan.add_argument("--link", default=None, choices=sorted(LINKS),
                      help="the ranks' interconnect for tensor parallelism (default: nvlink on GPU presets, "
                           "cpu on the cpu preset)")
    plan.add_argument("--link-bandwidth", type=float, default=None, help="override: bytes/s of each rank's link")
    plan.add_argument("--link-latency", type=float, default=None, help="override: seconds a collective costs at least")
    plan.add_argument("--sweep", nargs="*", default=[], metavar="NAME=V1,V2",
                      help="settings to sweep: block_size, admission_cap, kv_memory, kv_tokens, max_num_seqs, "
                           "max_num_batched_tokens, preemption_mode, headroom_policy, watermark, kv_layout, "
                           "tensor_parallel_size, kv_cache_dtype, replicas (engines sharing the trace round-robin)")
    plan.add_argument("--slo", default="", help="e.g. ttft_p99=2s,tpot_p99=100ms: the recommendation must meet it")
    plan.add_argument("--rate-factors", default="0.5,1,2,4,8",
                      help="replay at these multiples of the trace's rate to find where thrashing starts ('' skips)")
    plan.add_argument("--onset-search", choices=("fast", "all"), default="fast",
                      help="fast (default): replay only the factors and the part of the trace that decide where "
                           "thrashing starts (the same answer); all: replay every factor in full")
    plan.add_argument("--no-layouts", dest="layouts", action="store_false",
                      help="skip the paged-versus-contiguous comparison")
    plan.add_argument("--out", default="plan-report", help="folder for plan.md, plan.json and plots")
    plan.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    plan.add_argument("--html", action="store_true", help="also write OUT/dashboard.html: the KV page map of the "
                      "replay (and of each contiguous layout), with a time scrubber; opens from the file")


def _model_path(model: str | None) -> Path:
    if model is None:
        return Path(str(resources.files("kvpage").joinpath("assets", "demo-model")))
    return Path(model)


def model_config_dict(path: Path) -> dict[str, Any]:
    """The model's Hugging Face config: a directory's config.json, or a GGUF file's metadata (no torch either way)."""
    if is_gguf_path(path):
        return read_gguf_metadata(path).config
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {str(path)!r} has no config.json (give a Hugging Face directory or a .gguf file)")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object")
    return config


def ranks_link(args: argparse.Namespace) -> Link | None:
    """The tensor-parallel link of the command line: a preset, its numbers overridden (None: the hardware's)."""
    if args.link is None and args.link_bandwidth is None and args.link_latency is None:
        return None
    base = LINKS[args.link or ("cpu" if args.hardware == "cpu" else "nvlink")]
    bandwidth = base.bytes_per_s if args.link_bandwidth is None else args.link_bandwidth
    latency = base.latency_s if args.link_latency is None else args.link_latency
    if bandwidth <= 0 or latency < 0:
        raise ValueError(f"--link-bandwidth must be > 0 and --link-latency >= 0, got {bandwidth} and {latency}")
    return Link(base.name if (args.link_bandwidth, args.link_latency) == (None, None) else f"{base.name} (custom)",
                bandwidth, latency)


@dataclass
class PlanInputs:
    """What the command line describes: the trace, the engine settings, the cost model and the rate factors."""

    model_dir: Path
    model: ModelShape
    cost: CostModel
    workload: Workload
    settings: ReplaySettings
    factors: tuple[float, ...]
    sweep: dict[str, list[Any]]
    slo: dict[str, float]


def plan_inputs(args: argparse.Namespace) -> PlanInputs:
    """Parse and check ``kvpage plan``'s arguments into what the replays need."""
    model_dir = _model_path(args.model)
    config = model_config_dict(model_dir)
    calibrated = CalibratedCostModel.load(args.cost_model) if args.cost_model is not None else None
    device = calibrated.device if calibrated is not None else args.hardware
    device_type = "cpu" if device.startswith("cpu") else "cuda"
    model = ModelShape.from_dict(config, args.dtype_bytes or (4 if device_type == "cpu" else 2))
    cost: CostModel = calibrated or PhysicsCostModel(HARDWARE[args.hardware], model, link=ranks_link(args))
    max_len = args.max_model_len or config.get("max_position_embeddings", 4096)
    limits = TraceLimits(max_model_len=max_len, vocab_size=config.get("vocab_size", 32000))
    if (args.trace is None) == (args.synthetic is None):
        raise ValueError("give a trace file or --synthetic NAME (one of them)")
    if args.synthetic is not None:
        if args.num < 1:
            raise ValueError(f"--num must be an integer >= 1, got {args.num}")
        workload = synthetic_trace(args.synthetic, args.num, args.rate, limits, args.seed, args.burstiness)
    else:
        workload = load_trace(args.trace, limits)
    if args.kv_memory is not None and args.kv_tokens is not None:
        raise ValueError("give --kv-memory or --kv-tokens, not both")
    options = {name: getattr(args, name) for name in ENGINE_FLAGS}
    options["max_model_len"] = max_len
    if options["tensor_parallel_size"] is None:
        options["tensor_parallel_size"] = calibrated.tensor_parallel_size if calibrated is not None else 1
    if options["kv_cache_dtype"] is None:
        options["kv_cache_dtype"] = calibrated.kv_cache_dtype if calibrated is not None else "auto"
    if args.kv_tokens is None:
        options["kv_cache_memory"] = parse_bytes(args.kv_memory or "8GiB")
    settings = ReplaySettings(options=options, kv_tokens=args.kv_tokens, max_model_len=max_len,
                              vocab_size=limits.vocab_size, device_type=device_type)
    sweep, slo = parse_sweep(args.sweep), parse_slo(args.slo)
    try:
        factors = tuple(float(f) for f in args.rate_factors.split(",") if f.strip())
    except ValueError:
        raise ValueError(f"--rate-factors must be numbers separated by commas, got {args.rate_factors!r}") from None
    if any(f <= 0 for f in factors):
        raise ValueError(f"--rate-factors must be positive, got {args.rate_factors!r}")
    return PlanInputs(model_dir, model, cost, workload, settings, factors, sweep, slo)


@contextmanager
def rare_collections() -> Iterator[None]:
    """Run the cyclic garbage collector rarely, as a replay wants, and as it was after.

    A replay makes and drops millions of small containers (sequences, their
    token lists, step records), and reference counting frees them: the
    default thresholds (a young pass every 700 net allocations) would trace
    them over and over for the few cycles there are, 3% of the default
    command (docs/benchmarks.md).
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def run_plan(args: argparse.Namespace) -> int:
    with rare_collections():
        return _plan(args)


def _plan(args: argparse.Namespace) -> int:
    inputs = plan_inputs(args)
    model_dir, model, cost, workload, settings = (inputs.model_dir, inputs.model, inputs.cost, inputs.workload,
                                                  inputs.settings)
    factors, sweep, slo = inputs.factors, inputs.sweep, inputs.slo
    start = time.perf_counter()
    # The contiguous layouts follow the paged replay as shadows: replayed in full only where they would part.
    shadows = [layout for layout in KV_LAYOUTS if layout != "paged"] \
        if args.layouts and settings.options.get("kv_layout") == "paged" else []
    base = replay(workload, settings, cost, model, shadow_layouts=shadows)
    seconds = time.perf_counter() - start
    report = PlanReport(args.trace or f"synthetic {args.synthetic}", len(workload.requests), offered_rate(workload),
                        str(model_dir), cost.describe(), base, slo, replay_seconds=seconds)
    report.phase_seconds["replay"] = seconds
    if sweep or slo:
        start = time.perf_counter()
        report.sweep, report.recommended = run_sweep(workload, settings, sweep, slo, cost, model)
        report.phase_seconds["sweep"] = time.perf_counter() - start
    if factors and report.offered_rate != float("inf"):
        start = time.perf_counter()
        if args.onset_search == "all":
            rows, onset = thrashing_onset(workload, settings, cost, model, factors, base=base)
            report.onset_search = OnsetSearch(rows, onset, "all", list(factors))
        else:
            report.onset_search = fast_thrashing_onset(workload, settings, cost, model, factors, base=base)
        report.onset_rows, report.onset_rate = report.onset_search.rows, report.onset_search.onset_rate
        report.phase_seconds["rate_search"] = time.perf_counter() - start
    if args.layouts:
        start = time.perf_counter()
        report.layouts = layout_savings(workload, settings, cost, model, base=base)
        report.phase_seconds["layouts"] = time.perf_counter() - start
    write_report(report, Path(args.out), "kvpage " + " ".join(sys.argv[1:]))
    print(json.dumps(to_json(report), indent=1, default=str) if args.json else table(report))
    if args.html:
        page = write_timelines(workload, settings, cost, model, list(shadows),
                               Path(args.out) / "dashboard.html", f"kvpage plan: {report.trace}")
    if not args.json:
        print(f"\nreport: {Path(args.out) / 'plan.md'}" + (f"\nKV page map: {page}" if args.html else ""))
    return 0


def write_timelines(workload: Workload, settings: ReplaySettings, cost: CostModel, model: ModelShape,
                    other_layouts: list[KVLayout], path: Path, title: str) -> Path:
    """The offline KV page map of the replay, and of each of ``other_layouts``, every step (no fast-forward)."""
    own = settings.options.get("kv_layout", "paged")
    runs = []
    for layout in [own, *(layout for layout in other_layouts if layout != own)]:
        timeline = Timeline(layout)
        replay(workload, apply_setting(settings, "kv_layout", layout), cost, model, fast=False, timeline=timeline)
        runs.append((layout, timeline.frames))
    return write_offline_page(path, title, runs)
