"""How well ``kvpage plan`` predicts the real engine: calibrate, then run four workloads both ways.

On the local device (``--device cpu`` or ``cuda``): ``kvpage bench --calibrate``'s
grid fits the cost model, run in two halves, each followed by a real run of
every workload (a seeded synthetic trace), so that both sides see the same
machine (kvpage.bench.accuracy); then the planner replays each workload, and
the script prints predicted / measured for throughput (generated tokens/s) and mean TPOT, and
whether the memory figures (preemptions, recomputed tokens) agree.

    python benchmarks/plan_accuracy.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kvpage.bench.accuracy import measure_accuracy
from kvpage.bench.calibrate import CalibrationGrid
from kvpage.llm import LLM
from kvpage.plan.cost import ModelShape
from kvpage.plan.replay import ReplaySettings
from kvpage.plan.trace import TraceLimits, synthetic_trace

WORKLOADS = (("alpaca", 64, None), ("uniform", 24, 8.0), ("shared-prefix-chat", 40, 20.0), ("sharegpt", 48, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-pages", type=int, default=256)
    parser.add_argument("--scale", type=int, default=1, help="multiply each workload's request count")
    parser.add_argument("--decode-steps", type=int, default=None,
                        help="tokens each calibration request decodes (default: 32 on a GPU, 8 on a CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    new_llm = lambda: LLM(device=args.device, num_kv_blocks=args.kv_pages, block_size=16)
    engine = new_llm().engine
    dtype_bytes = torch.finfo(engine.dtype).bits // 8
    model = ModelShape.from_config(Path(engine.model_dir) / "config.json", dtype_bytes)
    limits = TraceLimits(engine.max_model_len, engine.model_config.vocab_size)
    settings = ReplaySettings(options={"block_size": 16}, kv_tokens=args.kv_pages * 16,
                              max_model_len=engine.max_model_len, vocab_size=limits.vocab_size,
                              device_type="cuda" if args.device.startswith("cuda") else "cpu")
    workloads = [(name, synthetic_trace(name, num * args.scale, rate, limits)) for name, num, rate in WORKLOADS]
    start = time.perf_counter()
    cost, results = measure_accuracy(new_llm, workloads, settings, model,
                                     CalibrationGrid(decode_steps=args.decode_steps))
    print(f"{platform.python_version()}, torch {torch.__version__}, device {args.device}; calibration and real "
          f"runs {time.perf_counter() - start:.0f} s: {cost.describe()}")
    rows = []
    for (_, _num, rate), result in zip(WORKLOADS, results):
        real, planned = result.real, result.planned
        row = {"workload": result.workload, "requests": result.num_requests, "rate": rate,
               **{f"real_{k}": v for k, v in real.items()},
               **{f"planned_{k}": v for k, v in planned.items()},
               **{f"ratio_{k}": result.ratio(k) for k in real},
               "real_preemptions": result.real_preemptions, "planned_preemptions": result.planned_preemptions}
        rows.append(row)
        print(f"{result.workload:<19} {result.num_requests:>4} req  out tok/s real "
              f"{real['goodput_tokens_per_s']:8.0f} planned "
              f"{planned['goodput_tokens_per_s']:8.0f} ({row['ratio_goodput_tokens_per_s']:.3f})   TPOT ms real "
              f"{1e3 * real['tpot_mean_s']:7.2f} planned {1e3 * planned['tpot_mean_s']:7.2f} "
              f"({row['ratio_tpot_mean_s']:.3f})   preemptions {row['real_preemptions']:.0f} / "
              f"{row['planned_preemptions']:.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": cost.describe(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
