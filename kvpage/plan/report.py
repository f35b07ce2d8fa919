"""What ``kvpage plan`` prints and writes: a table, ``plan.md``, PNG plots and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpage.plan.onset import OnsetSearch
from kvpage.plan.replay import ReplayResult
from kvpage.plan.sweep import SweepPoint

HEADLINE = (("requests_per_s", "req/s", "{:.2f}"), ("goodput_tokens_per_s", "out tok/s", "{:.0f}"),
            ("model_tokens_per_s", "model tok/s", "{:.0f}"), ("ttft_p50_s", "TTFT p50", "{:.3f}"),
            ("ttft_p99_s", "TTFT p99", "{:.3f}"), ("tpot_mean_s", "TPOT mean", "{:.4f}"),
            ("tpot_p99_s", "TPOT p99", "{:.4f}"), ("e2e_p99_s", "E2E p99", "{:.2f}"),
            ("batch_size_mean", "batch", "{:.1f}"), ("kv_capacity_tokens", "KV tokens", "{:.0f}"),
            ("kv_waste_mean", "waste", "{:.1%}"),
            ("num_preemptions", "preempt", "{:.0f}"), ("num_evictions", "evict", "{:.0f}"))


@dataclass
class PlanReport:
    trace: str
    num_requests: int
    offered_rate: float
    model: str
    cost_model: str
    base: ReplayResult
    slo: dict[str, float] = field(default_factory=dict)
    sweep: list[SweepPoint] = field(default_factory=list)
    recommended: SweepPoint | None = None
    onset_rows: list[dict[str, float]] = field(default_factory=list)
    onset_rate: float | None = None
    onset_search: OnsetSearch | None = None  # which rate factors were replayed, and why the others were not
    layouts: dict[str, dict[str, float]] = field(default_factory=dict)
    replay_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part of the plan


def _row(summary: dict[str, float]) -> list[str]:
    return [fmt.format(summary[key]) for key, _, fmt in HEADLINE]


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return [line(header), "-" * len(line(header)), *(line(r) for r in rows)]


def table(report: PlanReport) -> str:
    s = report.base.summary()
    rate = "all at once" if report.offered_rate == float("inf") else f"{report.offered_rate:.2f} req/s"
    lines = [(f"trace {report.trace}: {report.num_requests} requests, {rate}; model {report.model}; "
              f"cost model: {report.cost_model}"),
             (f"KV: {report.base.num_pages} pages of {report.base.block_size} tokens, "
              f"{s['kv_bytes_per_token']:.0f} B a token ({report.base.settings.kv_cache_dtype}); replayed in "
              f"{report.replay_seconds:.1f} s"), ""]
    lines += _grid(["setting", *(label for _, label, _ in HEADLINE)], [["base", *_row(s)]] + [
        [" ".join(f"{k}={v}" for k, v in p.setting.items()) + ("" if p.meets_slo else " (SLO miss)"),
         *_row(p.result.summary())] for p in report.sweep])
    thrash = (f"thrashing from {s['thrashing_onset_s']:.1f} s of the replay (peak recomputed share "
              f"{s['max_recompute_fraction']:.0%})" if s["thrashing_onset_s"] >= 0 else "no thrashing")
    lines += ["", (f"base: {thrash}; {s['num_recomputed_tokens']:.0f} tokens recomputed, "
                   f"{s['num_swapped_out']:.0f} swaps")]
    if report.slo:
        slo = ", ".join(f"{k} <= {v:g}s" for k, v in report.slo.items())
        if report.recommended is not None:
            setting = " ".join(f"{k}={v}" for k, v in report.recommended.setting.items()) or "base"
            lines.append(f"recommended ({slo}, most goodput): {setting}")
        else:
            lines.append(f"no setting meets the SLO ({slo})")
    search = report.onset_search
    if report.onset_rows or search is not None:
        lines += ["", "request rate sweep (arrivals compressed):"]
        if report.onset_rows:
            lines += _grid(["req/s", "out tok/s", "model tok/s", "recomputed", "preempt", "TTFT p99", "thrashing"], [
                [f"{r['request_rate']:.2f}", f"{r['goodput_tokens_per_s']:.0f}", f"{r['model_tokens_per_s']:.0f}",
                 f"{r['recompute_share']:.1%}", f"{r['num_preemptions']:.0f}", f"{r['ttft_p99_s']:.2f}",
                 _thrash_cell(r, report.num_requests)] for r in report.onset_rows])
        if search is not None and search.skipped:
            lines.append(f"not replayed: x{', x'.join(f'{f:g}' for f in search.skipped)} the trace's rate "
                         f"({search.reason})")
        if report.onset_rate is not None:
            lines.append(f"thrashing starts at {report.onset_rate:.2f} req/s")
        else:
            lines.append("no thrashing at any rate" if search is not None and search.skipped
                         else "no thrashing at any rate tried")
    if report.layouts:
        paged = report.layouts["paged"]
        lines += ["", "layouts, same KV memory:"]
        lines += _grid(["layout", "batch", "batch loaded", "waste", "KV held GiB", "out tok/s"], [
            [name, f"{v['batch_size_mean']:.1f}", f"{v['batch_size_mean_loaded']:.1f}", f"{v['kv_waste_mean']:.1%}",
             f"{v['kv_held_bytes_mean'] / 2**30:.3f}", f"{v['goodput_tokens_per_s']:.0f}"]
            for name, v in report.layouts.items()])
        for name in ("contiguous-request", "contiguous-max"):
            other = report.layouts[name]
            if other["batch_size_mean"]:
                lines.append(f"paging vs {name}: {paged['batch_size_mean'] / other['batch_size_mean']:.2f}x the "
                             f"batch; waste {other['kv_waste_mean']:.1%} -> {paged['kv_waste_mean']:.1%}")
    return "\n".join(lines)


def _thrash_cell(row: dict[str, float], num_requests: int) -> str:
    if not row["thrashing"]:
        return "no"
    replayed = int(row.get("requests_replayed", num_requests))
    return "yes" if replayed >= num_requests else f"yes (first {replayed} requests)"


def to_json(report: PlanReport) -> dict[str, Any]:
    return {"trace": report.trace, "num_requests": report.num_requests, "offered_rate": report.offered_rate,
            "model": report.model, "cost_model": report.cost_model, "num_pages": report.base.num_pages,
            "block_size": report.base.block_size, "replay_seconds": report.replay_seconds,
            "phase_seconds": report.phase_seconds,
            "base": report.base.summary(), "series": report.base.series, "slo": report.slo,
            "sweep": [{"setting": p.setting, "meets_slo": p.meets_slo, "misses": p.misses,
                       **p.result.summary()} for p in report.sweep],
            "recommended": None if report.recommended is None else report.recommended.setting,
            "rates": report.onset_rows, "thrashing_onset_rate": report.onset_rate,
            "rate_search": None if report.onset_search is None else report.onset_search.to_json(),
            "layouts": report.layouts}


def write_report(report: PlanReport, out_dir: Path, command: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "plan.json"]
    written[0].write_text(json.dumps(to_json(report), indent=1, default=str) + "\n")
    written += _plots(report, out_dir)
    md = [f"# kvpage plan\n\n`{command}`\n", "```", table(report), "```\n"]
    md += [f"![{p.stem}]({p.name})\n" for p in written if p.suffix == ".png"]
    written.append(out_dir / "plan.md")
    written[-1].write_text("\n".join(md))
    return written


def load_pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plots(report: PlanReport, out_dir: Path) -> list[Path]:
    plt = load_pyplot()
    if plt is None:
        return []
    paths = []
    series = report.base.series
    if series.get("time_s"):
        panels = (("batch_size", "batch size"), ("kv_usage", "KV pages in use"), ("queue_length", "waiting"),
                  ("preemptions", "preemptions (cumulative)"), ("evictions", "cached-page evictions (cumulative)"))
        fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(8, 2.0 * (len(panels) + 1)), sharex=True)
        for ax, (key, title) in zip(axes, panels):
            ax.plot(series["time_s"], series[key], lw=1)
            ax.set_ylabel(title, fontsize=8)
        for kind in ("internal_fragmentation", "reservation_waste", "external_fragmentation"):
            axes[-1].plot(series["time_s"], series[kind], lw=1, label=kind.replace("_", " "))
        axes[-1].set_ylabel("waste (share of KV)", fontsize=8)
        axes[-1].legend(fontsize=7)
        axes[-1].set_xlabel("time (s, virtual)")
        fig.tight_layout()
        paths.append(out_dir / "timeline.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if report.onset_rows:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        rates = [r["request_rate"] for r in report.onset_rows]
        ax.plot(rates, [r["goodput_tokens_per_s"] for r in report.onset_rows], "o-", label="goodput (new tokens)")
        ax.plot(rates, [r["model_tokens_per_s"] for r in report.onset_rows], "s--", label="model tokens")
        if report.onset_rate is not None:
            ax.axvline(report.onset_rate, color="red", lw=1, label="thrashing starts")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "rates.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
