"""How long the default planner command takes: ``kvpage plan --synthetic sharegpt --num N --rate 50 --json``.

Runs the command (the built-in demo model, its default thrashing-onset
search and layout comparison) once per ``--num``, each in a fresh process,
and prints its wall time, its CPU time and, when the planner reports them,
the seconds of each part (base replay, rate search, layouts).  Pin it to
one core as the figures in docs/benchmarks.md were:

    taskset -c 0 python benchmarks/plan_default.py --num 5000 20000 100000
    taskset -c 0 python benchmarks/plan_default.py --code /path/to/old/checkout   # another version's kvpage

Anything after ``--`` is passed to ``kvpage plan`` (e.g. ``-- --kv-tokens 4096``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, nargs="+", default=[5000, 20000, 100000])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--code", default=None, help="a checkout whose kvpage to run (put first on PYTHONPATH)")
    parser.add_argument("--timeout", type=float, default=None, help="give up on a run after this many seconds")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more kvpage plan flags")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    env = dict(os.environ)
    if args.code is not None:
        # Absolute: the command runs in its output folder, where a relative path would name nothing (and the
        # installed kvpage would run instead, unnoticed).
        code = os.path.abspath(args.code)
        if not os.path.isdir(os.path.join(code, "kvpage")):
            parser.error(f"--code {args.code!r}: no kvpage package in {code}")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (code, env.get("PYTHONPATH"))))
    print(f"python {platform.python_version()} on {platform.machine()}, CPUs allowed: "
          f"{len(os.sched_getaffinity(0))}", flush=True)
    for num in args.num:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "kvpage.cli", "plan", "--synthetic", "sharegpt", "--num", str(num),
                       "--rate", str(args.rate), "--json", "--out", out, *extra]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            try:
                done = subprocess.run(command, check=False, env=env, capture_output=True, text=True,
                                      timeout=args.timeout, cwd=out)
            except subprocess.TimeoutExpired:
                print(f"{num} requests: did not finish in {args.timeout:.0f} s", flush=True)
                continue
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        if done.returncode:
            print(f"{num} requests: exit {done.returncode}\n{done.stderr[-2000:]}", flush=True)
            continue
        report = json.loads(done.stdout)
        phases = report.get("phase_seconds") or {"replay": report["replay_seconds"]}
        search = report.get("rate_search") or {}
        replayed = ", ".join(f"x{row['factor']:g}" for row in report["rates"])
        skipped = ", ".join(f"x{factor:g}" for factor in search.get("skipped", ()))
        print(f"{num} requests: {wall:.1f} s wall, {cpu:.1f} s CPU; "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
              + f"; rates replayed: {replayed or 'none'}" + (f", not replayed: {skipped}" if skipped else "")
              + f"; onset {report['thrashing_onset_rate']}", flush=True)


if __name__ == "__main__":
    main()
