"""The ``kvpage`` command line.

``kvpage generate [--model DIR|FILE.gguf] [--max-tokens N] [--temperature T] PROMPT...``
prints one completion per prompt; ``kvpage serve [--model DIR] [--host H]
[--port P] [--api-key KEY]`` runs the OpenAI-compatible HTTP server. Without
``--model`` both use the built-in demo model. Any error is one line on stderr and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2
EXIT_ERROR = 1


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine options, with vLLM's flag names where the concept is the same."""
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="Hugging Face model directory or .gguf file (default: the "
                       "built-in demo model)")
    group.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's, or the GGUF "
                       "file's)")
    group.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV page (power of two, 1-256)")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="exact number of KV pages")
    group.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--max-num-batched-tokens", type=int, default=8192)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    group.add_argument("--prefix-caching-hash-algo", default="sha256",
                       help="sha256 | builtin (Python's 64-bit hash: cheaper, for trusted prompts)")
    group.add_argument("--kv-layout", default="paged", help="paged | contiguous-request | contiguous-max "
                       "(the pre-paging baselines: one contiguous reservation per sequence)")
    group.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | fp8_e4m3 | fp8_e5m2: K/V in the "
                       "model's dtype, or 8 bits with a scale byte per token and KV head (about twice the tokens)")
    group.add_argument("--admission-cap", type=float, default=1.0,
                       help="admit a request only while KV use stays at or below this fraction")
    group.add_argument("--headroom-policy", default="watermark", help="watermark | conservative | none")
    group.add_argument("--watermark", type=float, default=0.01, help="free-page fraction kept for growth")
    group.add_argument("--preemption-mode", default="recompute", help="recompute | swap | auto")
    group.add_argument("--swap-space", type=float, default=4.0, help="GiB of host memory for swapped pages")
    group.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    group.add_argument("--async-scheduling", dest="async_scheduling", action="store_true", default=None,
                       help="schedule each step while the previous one runs (default: on with CUDA)")
    group.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    group.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                       help="split the model and its KV heads over this many devices (GPUs, or CPU processes)")
    group.add_argument("--distributed-backend", default="auto", help="auto | nccl | gloo (auto: NCCL on CUDA)")
    group.add_argument("--distributed-timeout", type=float, default=300.0,
                       help="seconds a collective waits for the other ranks before the engine fails")
    group.add_argument("--attention-backend", default="auto",
                       help="auto | sdpa | torch | triton (auto: the Triton kernels on CUDA, sdpa elsewhere; "
                            "torch: the pure-torch reference, the numerical spec)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keyword arguments given on the command line (EngineConfig validates them)."""
    names = ("model", "tokenizer", "dtype", "device", "seed", "block_size", "num_kv_blocks", "kv_cache_memory",
             "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
             "enable_prefix_caching", "prefix_caching_hash_algo", "kv_layout", "kv_cache_dtype",
             "admission_cap", "headroom_policy",
             "watermark", "preemption_mode", "swap_space", "enforce_eager", "async_scheduling", "attention_backend",
             "tensor_parallel_size", "distributed_backend", "distributed_timeout")
    return {name: getattr(args, name) for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpage", description="LLM serving over a paged KV cache")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete prompts and print the results")
    add_engine_arguments(gen)
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument("--metrics", action="store_true", help="print engine metrics to stderr at the end")

    from kvpage.plan.cli import add_plan_parser

    add_plan_parser(commands)
    bench = commands.add_parser("bench", help="compare KV layouts (paged vs contiguous) on synthetic workloads")
    add_engine_arguments(bench)
    bench.add_argument("--workloads", default="sharegpt,alpaca,uniform,long-single,shared-prefix-chat")
    bench.add_argument("--layouts", default="paged,contiguous-request,contiguous-max")
    bench.add_argument("--num-requests", type=int, default=64, help="requests per workload")
    bench.add_argument("--kv-tokens", type=int, default=4096, help="KV budget in token slots, for every layout")
    bench.add_argument("--sharing-n", default="2,4,6", help="n values of the sharing runs ('' to skip)")
    bench.add_argument("--beam-widths", default="2,4,6", help="beam widths of the sharing runs ('' to skip)")
    bench.add_argument("--sharing-requests", type=int, default=16)
    bench.add_argument("--preemption-modes", default="swap",
                       help="extra paged runs with these modes (swap, auto), beside recompute; '' to skip")
    bench.add_argument("--out", default="bench-report", help="folder for report.md, report.json and plots")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    bench.add_argument("--html", action="store_true", help="also write OUT/dashboard.html: each case's KV page "
                       "map over time, with a time scrubber; opens from the file")
    bench.add_argument("--calibrate", action="store_true",
                       help="instead: time the engine's steps at a grid of batch shapes and save the fitted "
                            "cost model for kvpage plan --cost-model")
    bench.add_argument("--calibration-out", default="kvpage-calibration.json")

    srv = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 routes and the dashboard's data")
    srv.add_argument("--served-model-name", default=None, help="model id in the API (default: --model, "
                     "or 'kvpage-demo' for the built-in model)")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    srv.add_argument("--max-n", type=int, default=16, help="largest n accepted")
    srv.add_argument("--max-stop-strings", type=int, default=16)
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from kvpage import LLM, SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
                            seed=args.seed if args.temperature > 0 else None)
    llm = LLM(**engine_options(args))
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for output in outputs:
        if args.json:
            print(json.dumps({"prompt": output.prompt, "outputs": [
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                for c in output.outputs]}))
            continue
        for completion in output.outputs:
            print(f"{output.prompt}{completion.text}")
    if args.metrics:
        print(json.dumps(llm.get_metrics(), indent=1), file=sys.stderr)
    sys.stdout.flush()  # the answers are out before any teardown at exit (tensor-parallel ranks)
    return 0


def _int_list(flag: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in value.split(",") if n.strip())
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of integers, got {value!r}") from None


def run_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvpage.bench.report import table, to_json, write_report
    from kvpage.bench.run import BenchConfig
    from kvpage.bench.run import run_bench as bench

    if args.calibrate:
        from kvpage.bench.calibrate import calibrate
        from kvpage.llm import LLM

        model = calibrate(LLM(**engine_options(args)))
        model.save(args.calibration_out)
        print(f"{model.describe()}; saved to {args.calibration_out}")
        return 0
    options = engine_options(args)
    for fixed in ("kv_layout", "block_size", "num_kv_blocks", "max_num_seqs", "kv_cache_memory", "preemption_mode"):
        options.pop(fixed)  # the bench sets these itself, the same for every layout
    sharing, widths = (_int_list(flag, value) for flag, value in (("--sharing-n", args.sharing_n),
                                                                  ("--beam-widths", args.beam_widths)))
    config = BenchConfig(workloads=tuple(w.strip() for w in args.workloads.split(",") if w.strip()),
                         layouts=tuple(x.strip() for x in args.layouts.split(",") if x.strip()),
                         num_requests=args.num_requests, kv_tokens=args.kv_tokens, block_size=args.block_size,
                         max_num_seqs=args.max_num_seqs, seed=args.seed, sharing_ns=sharing, beam_widths=widths,
                         sharing_requests=args.sharing_requests, engine_options=options,
                         preemption_modes=tuple(m.strip() for m in args.preemption_modes.split(",") if m.strip()),
                         timelines=args.html)
    progress = None if args.json else (lambda message: print(f"# {message}", file=sys.stderr, flush=True))
    results = bench(config, progress)
    write_report(results, Path(args.out), "kvpage " + " ".join(sys.argv[1:]))
    print(json.dumps(to_json(results), indent=1) if args.json else table(results))
    if args.html:
        from kvpage.dashboard import write_offline_page

        page = write_offline_page(Path(args.out) / "dashboard.html", f"kvpage bench: {results.model}",
                                  [(timeline.name, timeline.frames) for timeline in results.timelines])
    if not args.json:
        print(f"\nreport: {Path(args.out) / 'report.md'}" + (f"\nKV page map: {page}" if args.html else ""))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"kvpage serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'kvpage[serve]'") from None
    from kvpage.server.launch import ServeOptions, serve
    from kvpage.server.protocol import ServerLimits

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be an integer in [0, 65535] (0: any free port), got {args.port}")
    for name in ("max_body_bytes", "max_n", "max_stop_strings"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                          max_stop_strings=args.max_stop_strings)
    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key,
                           served_model_name=args.served_model_name, log_level=args.log_level, limits=limits)
    return serve(engine_options(args), options)


def log_to_stderr() -> None:
    """Let the engine's start-up facts (a GGUF file's dequantization) and warnings reach the terminal."""
    log = logging.getLogger("kvpage")
    if any(h.get_name() == "kvpage-cli" for h in log.handlers):
        return  # main() called again in one process (tests)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("kvpage-cli")
    handler.setFormatter(logging.Formatter("kvpage: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            log_to_stderr()
            return run_generate(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "bench":
            log_to_stderr()
            return run_bench(args)
        if args.command == "plan":
            from kvpage.plan.cli import run_plan

            return run_plan(args)
        parser.error(f"unknown command {args.command!r}")
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"kvpage: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kvpage: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
