"""Time from a cold ``kvpage generate`` command to its printed completion.

Issue #7's budget: on the 2-core CPU machine, ``kvpage generate`` with the
default (demo) model starts and prints 64 tokens in under 10 s.  Each run is a
fresh process, exactly as a user types it, so the figure includes Python
start-up, importing torch and transformers, loading the weights and
tokenizer, sizing the KV cache, prefill and 64 decode steps.  ``--ignore-eos``
makes every run print exactly 64 tokens.

A second, in-process pass splits one run into its parts (import, ``LLM()``,
``generate``) to show where the time goes.

    python benchmarks/startup.py [--runs 5] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

PROMPT = "And God said"


def cold_run(max_tokens: int) -> float:
    command = [sys.executable, "-m", "kvpage.cli", "generate", PROMPT, "--max-tokens", str(max_tokens),
               "--ignore-eos", "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    printed = json.loads(done.stdout)
    assert len(printed["outputs"][0]["token_ids"]) == max_tokens, printed
    return elapsed


def in_process_split(max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    from kvpage import LLM, SamplingParams
    imported = time.perf_counter()
    llm = LLM()
    loaded = time.perf_counter()
    llm.generate(PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    generated = time.perf_counter()
    return {"import_s": imported - start, "load_s": loaded - imported, "generate_s": generated - loaded}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    # Versions from package metadata: importing torch here would hide its import time from the split.
    print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {version('torch')}, transformers {version('transformers')}")
    cold_run(args.max_tokens)  # warms the OS file cache, as any second invocation would be
    times = [cold_run(args.max_tokens) for _ in range(args.runs)]
    print(f"cold `kvpage generate` to {args.max_tokens} printed tokens over {args.runs} runs: "
          f"median {statistics.median(times):.2f} s, min {min(times):.2f} s, max {max(times):.2f} s")
    split = in_process_split(args.max_tokens)
    print("in-process split: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
          + f"; {args.max_tokens / split['generate_s']:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
