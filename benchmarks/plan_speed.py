"""How fast ``kvpage plan`` replays: 100,000 ShareGPT-like requests through the scheduler (issue #6 budget).

The model is a Llama-3-8B-shaped config.json (no weights: the planner reads
only the shape), on the H100 physics preset with 40 GiB of KV cache, at a
Poisson rate of ``--rate`` requests/s.  Prints the wall time of trace
generation and of the replay, and the replay's cost per generated token.

    python benchmarks/plan_speed.py [--num 100000] [--rate 20] [--stepped]

``--stepped`` turns the decode fast-forward off (the same result, step by step).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from kvpage.plan.cost import HARDWARE, ModelShape, PhysicsCostModel
from kvpage.plan.replay import ReplaySettings, replay
from kvpage.plan.trace import TraceLimits, synthetic_trace

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--stepped", action="store_true", help="no decode fast-forward")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(LLAMA3_8B))
        model = ModelShape.from_config(config)
    limits = TraceLimits(args.max_model_len, LLAMA3_8B["vocab_size"])
    start = time.perf_counter()
    trace = synthetic_trace("sharegpt", args.num, args.rate, limits)
    generated = time.perf_counter() - start
    settings = ReplaySettings(options={"block_size": 16, "kv_cache_memory": 40 << 30},
                              max_model_len=args.max_model_len, vocab_size=limits.vocab_size)
    start = time.perf_counter()
    result = replay(trace, settings, PhysicsCostModel(HARDWARE["h100"], model), model, fast=not args.stepped)
    replayed = time.perf_counter() - start
    s = result.summary()
    tokens = s["num_generated_tokens"]
    print(f"python {platform.python_version()} on {platform.machine()}, one process")
    print(f"{args.num} requests at {args.rate} req/s; trace generated in {generated:.1f} s; replayed in "
          f"{replayed:.1f} s ({s['duration_s']:.0f} s of virtual time, {tokens / 1e6:.1f} M tokens generated, "
          f"{replayed / tokens * 1e6:.2f} us a token, mean batch {s['batch_size_mean']:.0f}, "
          f"{result.num_pages} pages)")


if __name__ == "__main__":
    main()
