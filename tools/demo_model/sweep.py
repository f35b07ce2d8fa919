#!/usr/bin/env python3
"""Pick the demo model's regularisation and length, then train the winner alone.

The KJV training split is only ~1M tokens, so an 11M-parameter model overfits
after roughly ten epochs; what matters is how long to train and how much
dropout to use. This script runs a small grid of ``train.py`` configurations
side by side on one GPU (all with the same seed and architecture), picks the
one with the lowest final validation loss, and then trains that configuration
again *alone* so that the recorded training time is that of a single run. The
second run's directory is the shipped model.

Usage (on one H100/H200; ~6 minutes in all):
    python tools/demo_model/sweep.py --work /tmp/demo-sweep --out .data/demo_model \
        --log .data/demo_model.train_log.json

The grid's logs are written to <work>/<name>.json, all together to
<work>/grid_logs.json (for plot_loss.py --grid), and summarised in
<work>/sweep_summary.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: extra train.py arguments (everything else is train.py's default)
GRID: dict[str, list[str]] = {
    "d20_s1000": ["--dropout", "0.2", "--max-steps", "1000"],
    "d20_s2000": ["--dropout", "0.2", "--max-steps", "2000"],
    "d30_s1000": ["--dropout", "0.3", "--max-steps", "1000"],
    "d30_s1500": ["--dropout", "0.3", "--max-steps", "1500"],
    "d30_s2000": ["--dropout", "0.3", "--max-steps", "2000"],
    "d30_s1500_wd3": ["--dropout", "0.3", "--max-steps", "1500", "--weight-decay", "0.3"],
    "d40_s2000": ["--dropout", "0.4", "--max-steps", "2000"],
    "d50_s2000": ["--dropout", "0.5", "--max-steps", "2000"],
}
COMMON = ["--eval-every", "100"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the grid's runs")
    ap.add_argument("--out", type=Path, required=True, help="the final model directory")
    ap.add_argument("--log", type=Path, required=True, help="the final run's JSON log")
    ap.add_argument("--time-budget", type=float, default=300.0, help="safety stop for every grid run (s)")
    ap.add_argument("--skip-final", action="store_true", help="only run the grid")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    train = [sys.executable, str(HERE / "train.py")]
    procs = {}
    for name, extra in GRID.items():
        cmd = train + extra + COMMON + ["--time-budget", str(args.time_budget),
                                        "--out", str(args.work / name), "--log", str(args.work / f"{name}.json")]
        out = open(args.work / f"{name}.out", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out)
    results = {}
    for name, (p, out) in procs.items():
        rc = p.wait()
        out.close()
        log_file = args.work / f"{name}.json"
        summary = json.loads(log_file.read_text()).get("summary") if log_file.exists() else None
        results[name] = {"rc": rc, "args": GRID[name], "summary": summary}
        s = summary or {}
        print(f"{name:16s} rc={rc} steps={s.get('steps')} early_stop={s.get('stopped_early')} "
              f"train={s.get('final_train_loss', float('nan')):.4f} val={s.get('final_val_loss', float('nan')):.4f} "
              f"best_val={s.get('best_val_loss', float('nan')):.4f}@{s.get('best_val_step')}", flush=True)
    finished = {n: r for n, r in results.items()
                if r["rc"] == 0 and r["summary"] and not r["summary"]["stopped_early"]}
    if not finished:
        sys.exit("error: no grid run finished")
    winner = min(finished, key=lambda n: finished[n]["summary"]["final_val_loss"])
    print(f"winner: {winner} {GRID[winner]}", flush=True)
    (args.work / "sweep_summary.json").write_text(json.dumps({"winner": winner, "runs": results}, indent=1))
    # All grid logs in one file, for plot_loss.py --grid.
    grid_logs = {n: json.loads((args.work / f"{n}.json").read_text())
                 for n in GRID if (args.work / f"{n}.json").exists()}
    (args.work / "grid_logs.json").write_text(json.dumps(grid_logs))
    if args.skip_final:
        return
    cmd = train + GRID[winner] + COMMON + ["--out", str(args.out), "--log", str(args.log)]
    print("final run:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
