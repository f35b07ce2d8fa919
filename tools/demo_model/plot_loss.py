#!/usr/bin/env python3
"""Draw the demo model's loss curve (docs/demo-model-loss.png) from train.py's JSON log.

Usage:
    python tools/demo_model/plot_loss.py --log .data/demo_model.train_log.json \
        [--grid grid_logs.json] [--png docs/demo-model-loss.png]

--grid is optional: a JSON object {run name: train.py log} (the sweep's runs);
when given, a second panel shows their validation curves.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--grid", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "demo-model-loss.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(args.log.read_text())
    recs = log["records"]
    steps = [r["step"] for r in recs]
    grid = json.loads(args.grid.read_text()) if args.grid else None
    fig, axes = plt.subplots(1, 2 if grid else 1, figsize=(12 if grid else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["train_loss_running"] for r in recs], label="train (running mean, dropout on)")
    ax.plot(steps, [r["train_loss"] for r in recs], label="train (eval mode, 32 fixed windows)")
    ax.plot(steps, [r["val_loss"] for r in recs], label="validation (all held-out verses)", linewidth=2)
    s = log["summary"]
    a = log["args"]
    ax.set_title(f"demo model: {s['parameters'] / 1e6:.1f}M params, {s['steps']} steps, "
                 f"{s['train_time_s']:.0f}s on {s['device']}", fontsize=10)
    ax.set_xlabel(f"step ({a['batch_size']} x {a['seq_len']} tokens)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.annotate(f"final val {s['final_val_loss']:.3f} (ppl {s['final_val_ppl']:.1f})",
                xy=(steps[-1], recs[-1]["val_loss"]), xytext=(-150, 40), textcoords="offset points",
                arrowprops={"arrowstyle": "->"}, fontsize=8)
    if grid:
        ax2 = axes[0][1]
        for name in sorted(grid):
            g = grid[name]
            ax2.plot([r["step"] for r in g["records"]], [r["val_loss"] for r in g["records"]], label=name)
        ax2.set_title("hyper-parameter sweep: validation loss (d = dropout %, s = steps)", fontsize=10)
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation cross-entropy")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
