"""The fast thrashing-onset search against the exhaustive one, case by case (the planner's default vs ``all``).

For each case (``kvpage plan`` flags), replays the trace once (the base),
then runs both searches over the rate factors and prints, per case: the
exhaustive search's verdict per factor (``T`` thrashes, ``.`` does not),
both onset rates, the CPU seconds of each search, and how many requests
the fast one replayed at each factor it tried.  It fails if an onset rate
differs, if a factor the fast search replayed in full differs in any
figure, or if a thrashing factor it proved on a prefix starts thrashing at
another instant.

    python benchmarks/plan_onset.py                      # the built-in cases
    python benchmarks/plan_onset.py --num 2000 -- --kv-tokens 4096 --rate-factors 0.5,1,2
"""

from __future__ import annotations

import argparse
import json
import shlex
import time

from kvpage.plan.cli import add_plan_parser, plan_inputs
from kvpage.plan.onset import fast_thrashing_onset
from kvpage.plan.replay import replay
from kvpage.plan.sweep import thrashing_onset

CASES = (  # --num and --rate are the script's; these come after --synthetic NAME
    "sharegpt",
    "sharegpt --kv-tokens 4096",
    "sharegpt --kv-tokens 4096 --seed 3",
    "sharegpt --kv-tokens 16384",
    "sharegpt --kv-tokens 65536",
    "sharegpt --kv-tokens 131072",
    "sharegpt --kv-tokens 262144",
    "sharegpt --kv-tokens 8192 --headroom-policy none",
    "sharegpt --kv-tokens 8192 --preemption-mode swap",
    "sharegpt --kv-tokens 32768 --burstiness 0.3",
    "sharegpt --kv-tokens 16384 --async-scheduling",
    "sharegpt --kv-tokens 65536 --max-num-seqs 64",
    "sharegpt --kv-tokens 65536 --rate-factors 8,1,0.5,2",
    "alpaca --kv-tokens 8192 --rate 20",
    "shared-prefix-chat --kv-tokens 16384 --rate 20",
    "sharegpt --hardware cpu --kv-tokens 8192 --rate 4 --num 1000",
)


def check(flags: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    inputs = plan_inputs(parser.parse_args(["plan", *flags]))
    workload, settings, cost, model, factors = (inputs.workload, inputs.settings, inputs.cost, inputs.model,
                                                inputs.factors)
    n = len(workload.requests)
    base = replay(workload, settings, cost, model)
    start = time.process_time()
    fast = fast_thrashing_onset(workload, settings, cost, model, factors, base=base)
    fast_s = time.process_time() - start
    start = time.process_time()
    rows, onset = thrashing_onset(workload, settings, cost, model, factors, base=base)
    all_s = time.process_time() - start
    exhaustive = {r["factor"]: r for r in rows}
    for row in fast.rows:
        other = exhaustive[row["factor"]]
        if row["requests_replayed"] == n:
            assert row == other, (flags, row, other)
        else:
            assert row["thrashing"] and row["thrashing_onset_s"] == other["thrashing_onset_s"], (flags, row, other)
    assert fast.onset_rate == onset, (flags, fast.onset_rate, onset)
    return {"case": " ".join(flags), "verdicts": "".join("T" if r["thrashing"] else "." for r in rows),
            "onset_all": onset, "onset_fast": fast.onset_rate, "all_cpu_s": round(all_s, 2),
            "fast_cpu_s": round(fast_s, 2),
            "replayed": {f"x{r['factor']:g}": int(r["requests_replayed"]) for r in fast.rows},
            "skipped": fast.reason.split(":")[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--json", action="store_true", help="one JSON object a case")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then one case's kvpage plan flags")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    cases = [["--synthetic", "sharegpt", *extra]] if extra else [["--synthetic", *shlex.split(c)] for c in CASES]
    if not args.json:
        print("| case | verdicts | onset (all) | onset (fast) | all, CPU s | fast, CPU s | requests replayed |")
        print("|---|---|---:|---:|---:|---:|---|")
    for flags in cases:
        defaults = [f for f, name in ((["--num", str(args.num)], "--num"), (["--rate", str(args.rate)], "--rate"))
                    if name not in flags]
        result = check([*flags, *(x for f in defaults for x in f)])
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        onset_all, onset_fast = (f"{v:.2f}" if isinstance(v, float) else "none" for v in
                                 (result["onset_all"], result["onset_fast"]))
        replayed = ", ".join(f"{k} {v}" for k, v in result["replayed"].items())  # type: ignore[attr-defined]
        if result["skipped"]:
            replayed += f" ({result['skipped']})"
        print(f"| `{result['case']}` | `{result['verdicts']}` | {onset_all} | {onset_fast} | {result['all_cpu_s']} | "
              f"{result['fast_cpu_s']} | {replayed} |", flush=True)


if __name__ == "__main__":
    main()
