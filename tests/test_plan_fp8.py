"""The planner and the bench with an 8-bit KV cache: the engine's pages, the format's bytes, calibrations' refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kvpage.kv.format import FP8_FORMATS, kv_format
from kvpage.plan.cost import FEATURES, HARDWARE, CalibratedCostModel, ModelShape, PhysicsCostModel, StepShape
from kvpage.plan.replay import ReplaySettings, build_scheduler, replay
from kvpage.plan.sweep import parse_sweep
from kvpage.plan.trace import TraceLimits, synthetic_trace

DEMO = Path(__file__).resolve().parent.parent / "kvpage" / "assets" / "demo-model"
LIMITS = TraceLimits(max_model_len=1024, vocab_size=4096)
MODEL = ModelShape.from_config(DEMO / "config.json", dtype_bytes=4)  # float32 on the CPU
CPU = PhysicsCostModel(HARDWARE["cpu"], MODEL)


def at(kv_cache_memory: int, kv_cache_dtype: str, **options: object) -> ReplaySettings:
    return ReplaySettings(options={"block_size": 16, "kv_cache_memory": kv_cache_memory,
                                   "kv_cache_dtype": kv_cache_dtype, **options},
                          max_model_len=1024, vocab_size=4096, device_type="cpu")


@pytest.mark.parametrize("options", [{"preemption_mode": "recompute"},
                                     {"preemption_mode": "swap", "swap_space": 0.002}])
def test_an_fp8_replay_has_the_fp8_engines_pages_and_schedule(options: dict[str, object]) -> None:
    """The same KV memory: the replay sizes 8-bit pages as the engine does, scales included, and schedules alike."""
    from kvpage.bench.trace_run import run_trace
    from kvpage.llm import LLM

    budget = 1 << 20  # 1 MiB: 10 float32 pages of the demo model, 42 of fp8
    workload = synthetic_trace("uniform", 12, None, LIMITS)
    planned = replay(workload, at(budget, "fp8", **options), CPU, MODEL)
    llm = LLM(device="cpu", kv_cache_memory=budget, block_size=16, kv_cache_dtype="fp8", **options)
    real = run_trace(llm, workload).metrics
    assert planned.num_pages == real["kv_blocks_total"] == budget // (16 * FP8_FORMATS["fp8_e4m3"].token_bytes(
        MODEL.num_layers, MODEL.num_kv_heads, MODEL.head_dim))
    summary = planned.summary()
    assert summary["kv_bytes_per_token"] == real["kv_bytes_per_token"]
    assert summary["kv_capacity_tokens"] == planned.num_pages * 16
    assert summary["num_preemptions"] == real["num_preemptions"] > 0  # it binds even at 8 bits
    for key in ("num_recomputed_tokens", "num_swapped_out", "batch_size_mean", "batch_size_max", "kv_waste_mean",
                "kv_stored_mean"):
        assert summary[key] == real[key], key
    # The 16-bit replay in the same memory: about a quarter of the pages (float32 values, no scales).
    assert build_scheduler(at(budget, "auto"), MODEL)[1] == budget // (16 * MODEL.kv_bytes_per_token)


def test_the_physics_model_reads_the_formats_bytes_a_kv_token() -> None:
    gpu = PhysicsCostModel(HARDWARE["h200"], replace(MODEL, dtype_bytes=2, num_parameters=8_000_000_000))
    fp8 = gpu.for_engine(1, "fp8")
    assert gpu.for_engine(1, "auto") is gpu and "fp8_e4m3 KV" in fp8.describe() and "KV" not in gpu.describe()

    def per_kv_token(cost: PhysicsCostModel) -> float:
        """Seconds one more K/V token read adds to a memory-bound decode step."""
        short, long = (StepShape(64, 0, 64, 64, 64 * c, 64 * c, 64 * c) for c in (4096, 8192))
        return (cost.step_time(long) - cost.step_time(short)) / (64 * 4096)

    bf16, e4m3 = (kv_format(d, 2).token_bytes(MODEL.num_layers, MODEL.num_kv_heads, MODEL.head_dim)
                  for d in ("auto", "fp8"))
    assert per_kv_token(fp8) / per_kv_token(gpu) == pytest.approx(e4m3 / bf16)  # (64 + 1) / 128 a value
    assert per_kv_token(fp8) < 0.51 * per_kv_token(gpu)


def test_a_sweep_over_kv_cache_dtype_says_what_fp8_buys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvpage.cli import main

    assert main(["plan", "--synthetic", "sharegpt", "--num", "80", "--hardware", "h200", "--dtype-bytes", "2",
                 "--kv-memory", "8MiB", "--sweep", "kv_cache_dtype=auto,fp8,fp8_e5m2", "--rate-factors", "",
                 "--no-layouts", "--json", "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    auto, e4m3, e5m2 = report["sweep"]
    assert [p["setting"] for p in report["sweep"]] == [{"kv_cache_dtype": d} for d in ("auto", "fp8", "fp8_e5m2")]
    assert report["base"]["kv_capacity_tokens"] == auto["kv_capacity_tokens"]  # the base is 16-bit
    assert e4m3["kv_bytes_per_token"] == e5m2["kv_bytes_per_token"] == 1560 and auto["kv_bytes_per_token"] == 3072
    assert e4m3["kv_capacity_tokens"] >= 1.9 * auto["kv_capacity_tokens"]
    # 16-bit binds (80 requests at once into 2.7k tokens); 8-bit pages hold a bigger batch and preempt less.
    assert auto["num_preemptions"] > e4m3["num_preemptions"]
    assert e4m3["batch_size_mean_loaded"] >= 1.5 * auto["batch_size_mean_loaded"] > 0
    assert e4m3["duration_s"] < auto["duration_s"]
    with pytest.raises(ValueError, match="sweep kv_cache_dtype value 'int8' is not one of auto, fp8, fp8_e4m3"):
        parse_sweep(["kv_cache_dtype=auto,int8"])
    with pytest.raises(SystemExit):  # argparse's refusal, naming the choices
        main(["plan", "--synthetic", "uniform", "--kv-cache-dtype", "fp8_e3m4"])
    assert "invalid choice: 'fp8_e3m4'" in capsys.readouterr().err


def test_a_calibration_times_its_own_kv_format_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvpage.bench.calibrate import fit_steps
    from kvpage.cli import main
    from kvpage.llm import LLM

    # The engine's format is recorded (measured steps stand in: only the record is checked here).
    samples = [(StepShape(b, 1, b + 16, b, 40 * b, 40 * b, 500 * b), 1e-3 + 1e-4 * b) for b in range(1, 24)]
    fitted = fit_steps(LLM(device="cpu", num_kv_blocks=8, kv_cache_dtype="fp8"), samples)
    assert fitted.kv_cache_dtype == "fp8_e4m3" and "fp8_e4m3 KV" in fitted.describe()
    path = tmp_path / "fp8.json"
    fitted.save(path)
    assert CalibratedCostModel.load(path) == fitted
    with pytest.raises(ValueError, match="calibrated with kv_cache_dtype='fp8_e4m3' and cannot time "
                                         "kv_cache_dtype='auto'.*--kv-cache-dtype auto"):
        replay(synthetic_trace("uniform", 4, None, LIMITS), at(1 << 20, "auto"), fitted, MODEL)
    assert replay(synthetic_trace("uniform", 4, None, LIMITS), at(1 << 20, "fp8_e4m3"), fitted, MODEL).num_pages
    common = ["plan", "--synthetic", "uniform", "--num", "20", "--kv-memory", "1MiB", "--rate-factors", "",
              "--no-layouts", "--json", "--out", str(tmp_path / "out"), "--cost-model", str(path)]
    assert main(common) == 0  # the calibration's format is the default
    assert json.loads(capsys.readouterr().out)["base"]["kv_bytes_per_token"] == 1560
    assert main([*common, "--kv-cache-dtype", "auto"]) == 1
    assert "calibrated with kv_cache_dtype='fp8_e4m3'" in capsys.readouterr().err
    # A calibration file from before the field was recorded is a 16-bit one.
    old = json.loads(path.read_text())
    del old["kv_cache_dtype"]
    path.write_text(json.dumps(old))
    assert CalibratedCostModel.load(path).kv_cache_dtype == "auto"
    assert CalibratedCostModel(tuple([1e-3] * (len(FEATURES) + 1))).for_engine(1, "auto") is not None


def test_bench_reports_each_cases_kv_format_and_memory() -> None:
    from kvpage.bench.report import table
    from kvpage.bench.run import BenchConfig, BenchResults, run_case
    from kvpage.llm import LLM
    from kvpage.workloads import WorkloadSpec, make_workload

    workload = make_workload(WorkloadSpec(name="uniform", num_requests=6, seed=0, vocab_size=4096, max_model_len=256))
    cases = [run_case(LLM(device="cpu", num_kv_blocks=32, block_size=16, max_model_len=256, kv_cache_dtype=d),
                      workload, "paged") for d in ("auto", "fp8_e5m2")]
    auto, e5m2 = cases
    assert (auto.kv_cache_dtype, e5m2.kv_cache_dtype) == ("float32", "fp8_e5m2")
    assert (auto.kv_bytes_per_token, e5m2.kv_bytes_per_token) == (MODEL.kv_bytes_per_token, 1560)
    assert auto.kv_tokens == e5m2.kv_tokens == 32 * 16
    assert auto.kv_memory_bytes == 32 * 16 * MODEL.kv_bytes_per_token
    assert auto.generated_tokens == e5m2.generated_tokens > 0
    lines = table(BenchResults(BenchConfig(), "demo", "cpu", 256, cases=cases)).splitlines()
    assert "KV dtype" in lines[0] and "B/token" in lines[0]
    assert lines[2].split()[-3:] == ["float32", str(MODEL.kv_bytes_per_token), "3.0"]
    assert lines[3].split()[-3:] == ["fp8_e5m2", "1560", "0.8"]
