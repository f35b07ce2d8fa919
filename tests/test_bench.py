"""``kvpage bench --json`` on a tiny workload: every figure is there, and paging wastes least."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpage.bench.run import BenchConfig
from kvpage.cli import main

FIELDS = {"workload", "layout", "n", "num_requests", "wall_s", "generated_tokens", "computed_tokens",
          "requests_per_s", "goodput_tokens_per_s", "model_tokens_per_s", "batch_size_mean", "batch_size_max",
          "batch_size_mean_loaded", "preemption_mode", "num_swapped_out",
          "stored", "internal_fragmentation", "reservation_waste", "external_fragmentation", "waste",
          "waste_of_used", "sharing_saving", "num_preemptions", "recomputed_tokens", "num_steps", "beam_width",
          "kv_cache_dtype", "kv_bytes_per_token", "kv_tokens"}


def test_bench_json_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["bench", "--json", "--workloads", "alpaca,uniform", "--num-requests", "8", "--kv-tokens", "256",
                 "--max-model-len", "256", "--sharing-n", "2", "--beam-widths", "2", "--sharing-requests", "3",
                 "--device", "cpu",
                 "--preemption-modes", "swap,auto",
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_tokens"] == 256 and report["max_model_len"] == 256 and report["model"].endswith("demo-model")
    cases = {(c["workload"], c["layout"]): c for c in report["cases"]}
    assert set(cases) == {(w, lay) for w in ("alpaca", "uniform")
                          for lay in ("paged", "contiguous-request", "contiguous-max")}
    assert [(c["workload"], c["preemption_mode"]) for c in report["preemption"]] == [
        ("alpaca", "swap"), ("uniform", "swap"), ("alpaca", "auto"), ("uniform", "auto")]
    swap = {c["workload"]: c for c in report["preemption"] if c["preemption_mode"] == "swap"}
    recompute = {c["workload"]: c for c in report["cases"] if c["layout"] == "paged"}
    preempted = [w for w in recompute if recompute[w]["num_preemptions"]]
    assert preempted  # 256 slots are tight enough to preempt; then swap must replace recompute
    for workload in preempted:
        assert recompute[workload]["recomputed_tokens"] > 0
        assert swap[workload]["num_swapped_out"] > 0 and swap[workload]["recomputed_tokens"] == 0
    for case in report["cases"] + report["sharing"] + report["beam_search"] + report["preemption"]:
        assert set(case) == FIELDS
        assert case["generated_tokens"] > 0 and case["wall_s"] > 0 and case["batch_size_max"] >= 1
        assert case["kv_tokens"] == 256 and case["kv_cache_dtype"] == "float32" and case["kv_bytes_per_token"] > 0
        kinds = case["stored"] + case["internal_fragmentation"] + case["reservation_waste"] \
            + case["external_fragmentation"]
        assert 0 < kinds <= 1 + 1e-9
    for workload in ("alpaca", "uniform"):
        paged, request, maximum = (cases[(workload, lay)] for lay in ("paged", "contiguous-request", "contiguous-max"))
        assert paged["waste"] < request["waste"] < maximum["waste"]
        assert paged["reservation_waste"] == 0 == paged["external_fragmentation"]
        assert paged["batch_size_mean"] > maximum["batch_size_mean"]
        assert paged["generated_tokens"] == request["generated_tokens"] == maximum["generated_tokens"]
    sharing = report["sharing"]
    assert [(c["workload"], c["n"]) for c in sharing] == [("alpaca", 2), ("sharegpt", 2)]
    assert all(c["sharing_saving"] > 0 for c in sharing)
    beams = report["beam_search"]
    assert [(c["workload"], c["beam_width"], c["n"]) for c in beams] == [("alpaca", 2, 1), ("sharegpt", 2, 1)]
    for beam, sample in zip(beams, sharing):  # beams share their generated prefix too, samples only the prompt
        assert beam["sharing_saving"] > sample["sharing_saving"] > 0
    assert {t["target"].split(",")[0] for t in report["targets"]} >= {"parallel-sampling saving",
                                                                        "beam-search saving"}
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    assert {p.name for p in out.glob("*.png")} == {"batch_throughput.png", "waste.png", "sharing.png"}


def test_bench_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="workloads contains 'nope'"):
        BenchConfig(workloads=("nope",)).validate()
    with pytest.raises(ValueError, match="layouts contains 'virtual'"):
        BenchConfig(layouts=("virtual",)).validate()
    with pytest.raises(ValueError, match=r"beam_widths contains 0; each must be from 1 to max_num_seqs \(256\)"):
        BenchConfig(beam_widths=(0,)).validate()
    assert main(["bench", "--workloads", "nope"]) == 1
