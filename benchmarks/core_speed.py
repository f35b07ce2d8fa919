"""The scheduling core's speed against another checkout, side by side in one run.

Runs ``benchmarks/step_overhead.py`` (engine overhead per step at
``--batch`` running requests) and ``benchmarks/plan_speed.py`` (a
``--num``-request replay) for this checkout and for ``--baseline`` (a
checkout of the commit before a change, e.g. ``git worktree add /tmp/base
HEAD~1``), alternating the two ``--rounds`` times so that a drifting
machine reaches both, each pinned to one core.  Reports every measurement,
the medians and their ratio (this checkout / baseline).

    python benchmarks/core_speed.py --baseline /tmp/base [--rounds 3] [--batch 256] [--num 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run(tree: Path, script: str, args: list[str], cpu: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = ["taskset", "-c", cpu, sys.executable, str(tree / "benchmarks" / script), *args]
    return subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True).stdout


def step_overhead_ms(tree: Path, batch: int, cpu: str) -> float:
    out = run(tree, "step_overhead.py", ["--batch-sizes", str(batch), "--steps", "40"], cpu)
    row = next(line for line in out.splitlines() if line.startswith(f"| {batch} |"))
    return float(row.split("|")[5])  # the overhead ms column


def replay_s(tree: Path, num: int, cpu: str) -> float:
    out = run(tree, "plan_speed.py", ["--num", str(num)], cpu)
    match = re.search(r"replayed in ([0-9.]+) s", out)
    if match is None:
        raise RuntimeError(f"plan_speed.py printed no replay time:\n{out}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--num", type=int, default=100_000)
    parser.add_argument("--cpu", default="0", help="the core to pin to (taskset -c)")
    args = parser.parse_args()
    trees = {"this": HERE, "baseline": args.baseline.resolve()}
    results: dict[str, dict[str, list[float]]] = {name: {"step": [], "replay": []} for name in trees}
    print(f"python {platform.python_version()} on {platform.machine()}; this = {HERE}, baseline = {args.baseline}")
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for name in order:
            results[name]["step"].append(step_overhead_ms(trees[name], args.batch, args.cpu))
            results[name]["replay"].append(replay_s(trees[name], args.num, args.cpu))
            print(f"round {round_}: {name}: overhead {results[name]['step'][-1]:.3f} ms a step, "
                  f"replay {results[name]['replay'][-1]:.1f} s", flush=True)
    print("\n| measure | this (median) | baseline (median) | this / baseline |")
    print("|---|---:|---:|---:|")
    for key, label in (("step", f"step overhead at {args.batch} running, ms"),
                       ("replay", f"{args.num}-request replay, s")):
        ours, theirs = statistics.median(results["this"][key]), statistics.median(results["baseline"][key])
        print(f"| {label} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.3f} |")


if __name__ == "__main__":
    main()
