"""``kvpage plan``: traces, the replay against the real engine, sweeps, thrashing onset, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kvpage.plan.cost import (
    FEATURES,
    HARDWARE,
    CalibratedCostModel,
    Link,
    ModelShape,
    PhysicsCostModel,
    StepShape,
)
from kvpage.plan.onset import (
    fast_thrashing_onset,
    no_rate_can_preempt,
    replay_until_thrashing,
    scale_rate,
)
from kvpage.plan.replay import ReplaySettings, build_scheduler, replay
from kvpage.plan.replicas import deal, replay_replicas
from kvpage.plan.sweep import (
    layout_savings,
    offered_rate,
    parse_slo,
    parse_sweep,
    run_sweep,
    thrashing_onset,
)
from kvpage.plan.trace import (
    TraceError,
    TraceLimits,
    dump_trace,
    parse_trace,
    synthetic_trace,
)
from kvpage.step_io import SchedulerOutput
from kvpage.workloads import Workload, WorkloadRequest

DEMO = Path(__file__).resolve().parent.parent / "kvpage" / "assets" / "demo-model"
LIMITS = TraceLimits(max_model_len=1024, vocab_size=4096)
MODEL = ModelShape.from_config(DEMO / "config.json", dtype_bytes=4)
CPU = PhysicsCostModel(HARDWARE["cpu"], MODEL)


def settings(kv_tokens: int = 4096, **options: object) -> ReplaySettings:
    return ReplaySettings(options={"block_size": 16, **options}, kv_tokens=kv_tokens, max_model_len=1024,
                          vocab_size=4096, device_type="cpu")


# ----- traces -----------------------------------------------------------------------------------
def test_trace_lines_parse_and_every_bad_line_is_reported_with_its_number() -> None:
    good = [
        '{"arrival_time": 0.5, "prompt_tokens": 40, "output_tokens": 8, "prefix_group": 1, "shared_prefix_tokens": 32}',
        '{"arrival_time": 0.1, "prompt_token_ids": [5, 6, 7], "output_tokens": 2, "n": 2}',
        "",
        ('{"arrival_time": 0.3, "prompt_tokens": 50, "output_tokens": 4, "prefix_group": 1, '
         '"shared_prefix_tokens": 32, "beam_width": 3, "priority": -1}'),
    ]
    workload = parse_trace(good, LIMITS)
    assert [r.arrival_time for r in workload.requests] == [0.1, 0.3, 0.5]  # sorted by arrival
    first, beam, grouped = workload.requests
    assert first.prompt_token_ids == (5, 6, 7) and first.n == 2
    assert beam.beam_width == 3 and beam.priority == -1 and len(beam.prompt_token_ids) == 50
    assert beam.prompt_token_ids[:32] == grouped.prompt_token_ids[:32]  # one group, one shared prefix
    assert beam.prompt_token_ids[32:] != grouped.prompt_token_ids[32:40]
    assert parse_trace(good, LIMITS) == workload  # ids are a function of the trace alone

    bad = good + [
        "not json",
        '{"arrival_time": -1, "prompt_tokens": 4, "output_tokens": 1}',
        '{"arrival_time": 0, "output_tokens": 1}',
        '{"arrival_time": 0, "prompt_tokens": 1000, "output_tokens": 100}',
        '{"arrival_time": 0, "prompt_tokens": 4, "output_tokens": 0, "colour": "red"}',
        '{"arrival_time": 0, "prompt_tokens": 4, "output_tokens": 2, "shared_prefix_tokens": 2}',
        '[1, 2]',
    ]
    with pytest.raises(TraceError) as caught:
        parse_trace(bad, LIMITS, "t.jsonl")
    message = str(caught.value)
    for number, text in ((5, "not valid JSON"), (6, "arrival_time must be a finite number of seconds >= 0"),
                         (7, "give exactly one of prompt_tokens"),
                         (8, "prompt (1000) + output_tokens (100) exceeds max_model_len (1024)"),
                         (9, "output_tokens must be an integer >= 1"), (9, "unknown field 'colour'"),
                         (10, "shared_prefix_tokens needs a prefix_group"), (11, "expected a JSON object")):
        assert f"t.jsonl:{number}: {text}" in message
    assert message.startswith("8 problem(s) in t.jsonl")


def test_synthetic_traces_are_seeded_and_arrive_at_the_asked_rate(tmp_path: Path) -> None:
    trace = synthetic_trace("sharegpt", 2000, 20.0, LIMITS, seed=1)
    assert trace == synthetic_trace("sharegpt", 2000, 20.0, LIMITS, seed=1)
    assert 18.0 < offered_rate(trace) < 22.0
    bursty = synthetic_trace("sharegpt", 2000, 20.0, LIMITS, seed=1, burstiness=0.2)
    gaps = [b.arrival_time - a.arrival_time for a, b in zip(bursty.requests, bursty.requests[1:])]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert 1.8 < cv < 2.7  # gamma shape 0.2: coefficient of variation 1 / sqrt(0.2) = 2.24 (Poisson: 1)
    path = tmp_path / "t.jsonl"
    path.write_text(dump_trace(trace))
    again = parse_trace(path.read_text().splitlines(), LIMITS)
    assert [r.prompt_token_ids for r in again.requests] == [r.prompt_token_ids for r in trace.requests]


# ----- the replay against the engine ----------------------------------------------------------------
@pytest.mark.parametrize("options", [{"preemption_mode": "recompute"}, {"preemption_mode": "swap", "swap_space": 0.002},
                                     {"kv_layout": "contiguous-request"}, {"headroom_policy": "conservative"},
                                     {"async_scheduling": True, "preemption_mode": "recompute"},
                                     {"async_scheduling": True, "preemption_mode": "swap", "swap_space": 0.002},
                                     {"async_scheduling": True, "kv_layout": "contiguous-request"}])
def test_replayed_memory_figures_equal_the_engines(options: dict[str, object]) -> None:
    """Same trace, same schedule (all at once): every memory figure of the engine, exactly.

    With ``async_scheduling`` the engine plans each step before the previous one's tokens are
    known (pages of finished requests come back a plan later); the replay then follows that order.
    """
    from kvpage.bench.trace_run import run_trace
    from kvpage.llm import LLM

    workload = synthetic_trace("uniform", 16, None, LIMITS)
    real = run_trace(LLM(device="cpu", num_kv_blocks=48, block_size=16, **options), workload).metrics
    planned = replay(workload, settings(48 * 16, **options), CPU, MODEL).summary()
    assert planned["num_preemptions"] == real["num_preemptions"]
    if options.get("preemption_mode") == "recompute":
        assert real["num_preemptions"] > 0 and planned["num_recomputed_tokens"] > 0  # the case means something
    for key in ("num_recomputed_tokens", "num_swapped_out", "num_generation_tokens", "batch_size_mean",
                "batch_size_max", "batch_size_mean_loaded", "kv_waste_mean", "kv_internal_fragmentation_mean",
                "kv_reservation_waste_mean", "kv_external_fragmentation_mean", "kv_stored_mean"):
        assert planned[key.replace("num_generation_tokens", "num_generated_tokens")] == real[key], key
    assert planned["num_evictions"] == real["kv_evictions"]


class StandInDevice:
    """A stand-in device whose step time is a known law of what the step computes (the test's ground truth).

    Written from the scheduled sequences directly, not through the planner's
    ``step_shape``: a step costs 3 ms, 0.4 ms a sequence, 0.15 ms a token and
    2 us a K/V token read (each sequence's context after the step): linear,
    as the cost model is.  ``curve`` below 1 bends it the way a CPU's matrix
    products do: a token's cost falls as the step grows (tokens ** curve),
    which no linear fit holds exactly.
    """

    def __init__(self, curve: float = 1.0) -> None:
        self.curve = curve

    def step_seconds(self, out: SchedulerOutput) -> float:
        tokens = sum(len(s.input_token_ids) for s in out.sequences)
        context = sum(s.start_position + len(s.input_token_ids) for s in out.sequences)
        return 3e-3 + 4e-4 * len(out.sequences) + 1.5e-4 * tokens ** self.curve + 2e-6 * context


def accuracy_ratios(device: StandInDevice) -> dict[tuple[str, str], float]:
    """Predicted over measured, per workload and figure, with ``device`` timing the engine's steps."""
    from kvpage.bench.accuracy import measure_accuracy
    from kvpage.bench.calibrate import CalibrationGrid
    from kvpage.llm import LLM

    def new_llm() -> LLM:
        return LLM(device="cpu", num_kv_blocks=128, block_size=16)

    model = ModelShape.from_config(Path(new_llm().engine.model_dir) / "config.json", 4)
    settings = ReplaySettings(options={"block_size": 16}, kv_tokens=128 * 16, max_model_len=1024,
                              vocab_size=4096, device_type="cpu")
    workloads = [(name, synthetic_trace(name, num, rate, TraceLimits(1024, 4096)))
                 for name, num, rate in (("alpaca", 24, None), ("uniform", 16, 40.0),
                                         ("shared-prefix-chat", 16, 60.0))]
    # kvpage bench --calibrate's grid, once (smaller grids fit the curved device worse: 1.17 off with
    # batch 1, 4, 8, 16 x context 16, 64, 256).
    _, rows = measure_accuracy(new_llm, workloads, settings, model, CalibrationGrid(repeats=1), clock=device)
    return {(row.workload, key): row.ratio(key) for row in rows for key in row.real}


def test_calibrated_plan_predicts_the_engine_on_a_linear_device() -> None:
    """Issue #6's accuracy target, held deterministically: calibration, fit and replay against the engine.

    The engine runs its model and scheduler for real, on a stand-in clock
    (:mod:`kvpage.bench.clock`: a wall-clock bound passes or fails with a shared
    machine's neighbours; benchmarks/plan_accuracy.py measures the wall).  A
    linear device is one the cost model can hold exactly, so throughput and
    mean TPOT must come out equal: any error is the calibration's shapes, the
    fit, the replay's schedule or its latency accounting.
    """
    ratios = accuracy_ratios(StandInDevice())
    assert ratios and all(r == pytest.approx(1.0, rel=1e-3) for r in ratios.values()), ratios


def test_calibrated_plan_predicts_a_curved_device_within_3_percent() -> None:
    """A device no linear fit holds (a token's cost falls with the step's size): within 3% (the target is 15%).

    It comes within 1.7% (shared-prefix-chat's TPOT, 0.983).
    """
    ratios = accuracy_ratios(StandInDevice(curve=0.75))
    assert all(r == pytest.approx(1.0, rel=0.03) for r in ratios.values()), ratios
    assert any(abs(r - 1.0) > 1e-3 for r in ratios.values()), ratios  # the curve is not fitted exactly


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_calibration_records_every_step_once(async_scheduling: bool) -> None:
    """Each step of the grid gives one sample, the asynchronous engine's included (a step completes a call late)."""
    import random

    from kvpage.bench.calibrate import CalibrationGrid, measure_steps
    from kvpage.llm import LLM

    grid = CalibrationGrid(batch_sizes=(1, 3), contexts=(16, 40), decode_steps=4, repeats=1)
    llm = LLM(device="cpu", num_kv_blocks=64, block_size=16, async_scheduling=async_scheduling)
    samples = measure_steps(llm, grid)
    rounds = grid.rounds(llm.engine.max_model_len - 4, random.Random(0))
    # Every request samples its 4 tokens in 4 steps: the last prefill chunk's, then 3 decodes.
    assert sum(shape.num_sampled for shape, _ in samples) == 4 * sum(len(lengths) for lengths, _ in rounds)
    assert sum(shape.num_tokens for shape, _ in samples) == sum(sum(lengths) + 3 * len(lengths)
                                                                for lengths, _ in rounds)
    assert all(seconds > 0 for _, seconds in samples)
    assert not llm.engine.has_unfinished_requests()


def test_a_calibration_of_an_asynchronous_engine_replays_in_its_order(tmp_path: Path) -> None:
    """The calibration says which order its engine ran in; a replay follows it unless its settings say otherwise.

    Then the memory figures equal the asynchronous engine's exactly, as if ``async_scheduling`` were given.
    """
    from kvpage.bench.calibrate import CalibrationGrid, fit_steps, measure_steps
    from kvpage.bench.trace_run import run_trace
    from kvpage.llm import LLM

    grid = CalibrationGrid(batch_sizes=(1, 3), contexts=(16, 40), decode_steps=4, repeats=1)
    costs = {}
    for overlapped in (False, True):
        llm = LLM(device="cpu", num_kv_blocks=64, block_size=16, async_scheduling=overlapped)
        costs[overlapped] = fit_steps(llm, measure_steps(llm, grid, clock=StandInDevice(curve=1.0)))
        assert costs[overlapped].async_scheduling is overlapped
        assert ("asynchronous" in costs[overlapped].describe()) is overlapped
    path = tmp_path / "cal.json"
    costs[True].save(path)
    assert CalibratedCostModel.load(path) == costs[True]
    data = json.loads(path.read_text())
    del data["async_scheduling"]  # a file of the version before: measured, as then, in the synchronous order
    path.write_text(json.dumps(data))
    assert CalibratedCostModel.load(path).async_scheduling is False

    workload = synthetic_trace("uniform", 16, None, LIMITS)
    real = run_trace(LLM(device="cpu", num_kv_blocks=48, block_size=16, async_scheduling=True), workload).metrics
    by_default = replay(workload, settings(48 * 16), costs[True], MODEL).summary()
    asked = replay(workload, settings(48 * 16, async_scheduling=True), costs[True], MODEL).summary()
    overridden = replay(workload, settings(48 * 16, async_scheduling=False), costs[True], MODEL).summary()
    synchronous = replay(workload, settings(48 * 16), costs[False], MODEL).summary()
    assert by_default == asked
    assert by_default["num_preemptions"] == real["num_preemptions"] > 0
    assert by_default["num_recomputed_tokens"] == real["num_recomputed_tokens"]
    assert by_default["kv_waste_mean"] == real["kv_waste_mean"]
    # Asked for the synchronous order, it replays that one, whose memory figures are not the engine's.
    assert overridden == synchronous
    assert overridden["num_recomputed_tokens"] != real["num_recomputed_tokens"]


def test_calibration_fit_recovers_a_known_linear_model(tmp_path: Path) -> None:
    truth = (2e-3, 1e-5, 3e-4, 2e-6, 1e-5, 1e-8, 0.0, 5e-9)
    shapes = [StepShape(s, p, t, s, t * 7, t * 9, t * t) for s in (1, 4, 16, 64) for p in (0, 1, 3)
              for t in (s, s * 10 + p, 512)]
    samples = [(shape, sum(c * x for c, x in zip(truth, shape.features()))) for shape in shapes]
    fitted = CalibratedCostModel.fit(samples, device="cpu")
    assert fitted.mean_abs_error < 0.01
    path = tmp_path / "cal.json"
    fitted.save(path)
    loaded = CalibratedCostModel.load(path)
    assert loaded == fitted and loaded.step_time(shapes[5]) == pytest.approx(samples[5][1], rel=0.01)
    path.write_text("{}")
    with pytest.raises(ValueError, match="is not a kvpage calibration file"):
        CalibratedCostModel.load(path)


# ----- the operator's questions ---------------------------------------------------------------------
def test_sweep_recommends_the_best_goodput_that_meets_the_slo() -> None:
    workload = synthetic_trace("sharegpt", 120, 12.0, LIMITS)
    sweep = parse_sweep(["kv_tokens=2048,8192", "max_num_seqs=4,64"])
    points, best = run_sweep(workload, settings(), sweep, parse_slo("ttft_p99=5s"), CPU, MODEL)
    assert len(points) == 4 and {tuple(p.setting.values()) for p in points} == {
        (2048, 4), (2048, 64), (8192, 4), (8192, 64)}
    passing = [p for p in points if p.meets_slo]
    assert best is not None and best in passing
    top = max(p.result.summary()["goodput_tokens_per_s"] for p in passing)
    assert best.result.summary()["goodput_tokens_per_s"] >= 0.99 * top
    assert best.result.summary()["ttft_p99_s"] == min(p.result.summary()["ttft_p99_s"] for p in passing
                                                      if p.result.summary()["goodput_tokens_per_s"] >= 0.99 * top)
    assert best.setting == {"kv_tokens": 8192, "max_num_seqs": 64}
    _, none = run_sweep(workload, settings(), sweep, parse_slo("ttft_p99=1ms"), CPU, MODEL)
    assert none is None
    with pytest.raises(ValueError, match="sweep entries are NAME=V1,V2"):
        parse_sweep(["page_size=16"])
    with pytest.raises(ValueError, match="slo entries are METRIC=DURATION"):
        parse_slo("ttft_p95=1s")


def test_overcommitment_thrashes_and_a_hard_cap_prevents_it() -> None:
    """The limits of paging, shown by replay: past the onset, raw throughput climbs and goodput does not."""
    workload = synthetic_trace("sharegpt", 300, 1.0, LIMITS)
    uncapped = settings(2048, headroom_policy="none")
    rows, onset = thrashing_onset(workload, uncapped, CPU, MODEL, factors=(1.0, 4.0, 16.0))
    calm, loaded, flooded = rows
    assert not calm["thrashing"] and onset is not None and onset > calm["request_rate"]
    assert flooded["thrashing"] and flooded["recompute_share"] > 0.2
    assert flooded["model_tokens_per_s"] > 2 * flooded["goodput_tokens_per_s"]
    assert flooded["goodput_tokens_per_s"] < 1.1 * loaded["goodput_tokens_per_s"]  # the extra work is recomputation
    capped = settings(2048, headroom_policy="none", admission_cap=0.5)
    rows, onset = thrashing_onset(workload, capped, CPU, MODEL, factors=(1.0, 4.0, 16.0))
    assert onset is None and rows[2]["recompute_share"] < 0.05
    assert rows[2]["goodput_tokens_per_s"] > 0.8 * flooded["goodput_tokens_per_s"]


def _same_onset(workload: Workload, config: ReplaySettings, factors: tuple[float, ...],
                prefixes: tuple[int, ...]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The fast search's answer is the exhaustive one; returns both searches' rows."""
    base = replay(workload, config, CPU, MODEL)
    rows, onset = thrashing_onset(workload, config, CPU, MODEL, factors)
    fast = fast_thrashing_onset(workload, config, CPU, MODEL, factors, base=base, prefixes=prefixes)
    assert fast.onset_rate == onset
    exhaustive = {r["factor"]: r for r in rows}
    for row in fast.rows:
        if row["requests_replayed"] == len(workload.requests):
            assert row == exhaustive[row["factor"]]  # a whole replay is the exhaustive search's
        else:  # a prefix proves thrashing from the very instant the whole trace starts
            assert row["thrashing"] and row["thrashing_onset_s"] == exhaustive[row["factor"]]["thrashing_onset_s"]
    evaluated = [r["factor"] for r in fast.rows]
    assert evaluated + fast.skipped == list(factors) and fast.to_json()["evaluated"] == evaluated
    return rows, fast.rows


def test_the_fast_onset_search_finds_the_exhaustive_onset() -> None:
    """Same onset rate, thrashing or not; it stops at the onset, and proves a thrashing rate on a prefix."""
    workload = synthetic_trace("sharegpt", 150, 1.0, LIMITS)
    overcommitted = settings(2048, headroom_policy="none")
    # At x4 the first 48 requests thrash only after the 49th would have arrived (and not from the same
    # instant as all 150): that proves nothing; the first 64 thrash before the 65th, as all 150 do.
    rows, fast = _same_onset(workload, overcommitted, (0.5, 1.0, 2.0, 4.0, 16.0), (48, 64))
    assert [r["thrashing"] for r in rows] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [r["factor"] for r in fast] == [0.5, 1.0, 2.0, 4.0]  # nothing after the onset
    assert fast[-1]["requests_replayed"] == 64  # the onset proved on a prefix
    flooded = scale_rate(workload, 16.0)
    whole = rows[-1]["thrashing_onset_s"]
    # The first 24 thrash after the 25th would have arrived, and sooner than all 150: that proves nothing;
    # the first 96 thrash before the 97th arrives.
    for prefixes, proved_by in (((24,), 150), ((24, 96), 96)):
        result, replayed = replay_until_thrashing(flooded, overcommitted, CPU, MODEL, prefixes)
        assert result.thrashing_onset_s == whole is not None and replayed == proved_by
    rows, fast = _same_onset(workload, settings(2048, headroom_policy="none", admission_cap=0.5), (1.0, 4.0),
                             (16, 64))
    assert not any(r["thrashing"] for r in rows) and fast == rows  # no onset: every factor, in full


def test_no_rate_thrashes_a_cache_that_holds_the_largest_requests() -> None:
    """The fast search replays nothing when no arrival pattern can preempt; replays agree at any rate."""
    workload = synthetic_trace("sharegpt", 200, 2.0, LIMITS)
    seqs = 8
    largest = sorted(-(-(len(r.prompt_token_ids) + r.output_tokens) // 16) + 1 for r in workload.requests)
    enough = sum(largest[-seqs:]) * 16
    config = settings(enough, max_num_seqs=seqs)
    assert no_rate_can_preempt(workload, config, MODEL)
    for factor in (1.0, 8.0, 1000.0):
        assert replay(scale_rate(workload, factor), config, CPU, MODEL).summary()["num_preemptions"] == 0
    fast = fast_thrashing_onset(workload, config, CPU, MODEL, (0.5, 1.0, 8.0))
    assert fast.rows == [] and fast.skipped == [0.5, 1.0, 8.0] and fast.onset_rate is None
    assert not no_rate_can_preempt(workload, settings(enough - 16, max_num_seqs=seqs), MODEL)
    assert not no_rate_can_preempt(workload, settings(enough, max_num_seqs=seqs, kv_layout="contiguous-max"), MODEL)
    beams = replace(workload, requests=(replace(workload.requests[0], beam_width=2), *workload.requests[1:]))
    assert not no_rate_can_preempt(beams, config, MODEL)
    # With half that memory the same trace does preempt, at a high enough rate.
    tight = settings(sum(largest[-seqs // 2:]) * 16, max_num_seqs=seqs)
    assert replay(scale_rate(workload, 1000.0), tight, CPU, MODEL).summary()["num_preemptions"] > 0


def test_a_single_long_request_gains_nothing_from_paging() -> None:
    workload = synthetic_trace("long-single", 1, None, LIMITS)
    layouts = layout_savings(workload, settings(4096), CPU, MODEL)
    assert {v["batch_size_max"] for v in layouts.values()} == {1}
    assert layouts["paged"]["goodput_tokens_per_s"] == layouts["contiguous-max"]["goodput_tokens_per_s"]
    chat = layout_savings(synthetic_trace("sharegpt", 64, None, LIMITS), settings(4096), CPU, MODEL)
    assert chat["paged"]["batch_size_mean_loaded"] > 2 * chat["contiguous-max"]["batch_size_mean_loaded"]


def test_replays_every_step_in_virtual_time() -> None:
    workload = synthetic_trace("alpaca", 30, 5.0, LIMITS)
    result = replay(workload, settings(), CPU, MODEL)
    summary = result.summary()
    assert summary["duration_s"] >= workload.requests[-1].arrival_time
    assert all(t.arrival <= t.first_token <= t.finished for t in result.timings)  # type: ignore[operator]
    assert summary["num_generated_tokens"] == sum(r.output_tokens for r in workload.requests)
    series = result.series
    assert series["time_s"] == sorted(series["time_s"]) and max(series["batch_size"]) <= 30
    slower = replay(workload, settings(), replace(CPU, hardware=replace(HARDWARE["cpu"], peak_flops=2e10)),
                    MODEL).summary()
    assert slower["tpot_mean_s"] > 2 * summary["tpot_mean_s"]


def test_plan_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvpage.cli import main

    out = tmp_path / "report"
    assert main(["plan", "--synthetic", "alpaca", "--num", "60", "--rate", "10", "--hardware", "cpu",
                 "--kv-tokens", "2048", "--sweep", "block_size=16,32", "--slo", "ttft_p99=2s",
                 "--rate-factors", "1,4", "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_requests"] == 60 and report["base"]["num_generated_tokens"] > 0
    assert [p["setting"] for p in report["sweep"]] == [{"block_size": 16}, {"block_size": 32}]
    assert report["recommended"] in ({"block_size": 16}, {"block_size": 32})
    assert [round(r["factor"]) for r in report["rates"]] == [1, 4] and set(report["layouts"]) == {
        "paged", "contiguous-request", "contiguous-max"}
    assert {p.name for p in out.iterdir()} == {"plan.json", "plan.md", "timeline.png", "rates.png"}
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"arrival_time": 0, "prompt_tokens": 4}\n')
    assert main(["plan", str(trace)]) == 1
    assert "bad.jsonl:1: output_tokens must be an integer >= 1" in capsys.readouterr().err
    assert main(["plan"]) == 1
    assert main(["plan", "--synthetic", "alpaca", "--sweep", "nope=1"]) == 1


def test_workload_type_is_the_trace_type() -> None:
    assert isinstance(synthetic_trace("uniform", 3, None, LIMITS), Workload)


def test_the_replays_cheaper_page_keys_change_nothing_but_their_cost() -> None:
    """The planner keys pages by Python's hash, the engine by sha256: the same chains, so the same replay."""
    from kvpage.modes import PREFIX_HASHES

    workload = synthetic_trace("shared-prefix-chat", 150, 30.0, LIMITS)
    runs = [replay(workload, settings(1536, prefix_caching_hash_algo=algo), CPU, MODEL) for algo in PREFIX_HASHES]
    summaries = [run.summary() for run in runs]
    assert summaries[0]["kv_sharing_saving_mean"] > 0.3 and summaries[0]["num_evictions"] > 0  # both matter here
    assert summaries[0] == summaries[1]
    assert runs[0].series == runs[1].series and runs[0].timings == runs[1].timings


def test_the_plan_command_collects_rarely_and_restores_the_collector() -> None:
    import gc

    from kvpage.plan.cli import rare_collections

    before = gc.get_threshold()
    with rare_collections():
        assert gc.get_threshold()[0] >= 100 * before[0]
    assert gc.get_threshold() == before
    with pytest.raises(KeyError), rare_collections():
        raise KeyError("a failed replay")
    assert gc.get_threshold() == before


# ----- tensor parallelism ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"preemption_mode": "recompute"},
                                     {"preemption_mode": "swap", "swap_space": 0.002}])
def test_a_tensor_parallel_replay_equals_the_tensor_parallel_engine(options: dict[str, object]) -> None:
    """Per-rank KV memory holds twice the pages at tp = 2 (one KV head a rank); the memory figures stay exact."""
    from kvpage.bench.trace_run import run_trace
    from kvpage.llm import LLM

    # Short requests (a tensor-parallel step on 2 cores is collectives' latency): 8 x 5 pages into 24.
    workload = Workload("short", "8 requests of 50 + 30 tokens", tuple(
        WorkloadRequest(tuple(range(3 + i, 53 + i)), 30) for i in range(8)))
    budget = 24 * 16 * MODEL.kv_bytes_per_token_per_rank(2)  # 24 pages of a rank's KV heads

    def at(tp: int) -> ReplaySettings:
        return ReplaySettings(options={"block_size": 16, "kv_cache_memory": budget, "tensor_parallel_size": tp,
                                       **options}, max_model_len=1024, vocab_size=4096, device_type="cpu")

    planned = replay(workload, at(2), CPU, MODEL)
    assert (planned.num_pages, build_scheduler(at(1), MODEL)[1]) == (24, 12)
    llm = LLM(device="cpu", kv_cache_memory=budget, block_size=16, tensor_parallel_size=2, **options)
    try:
        assert llm.get_metrics()["kv_blocks_total"] == 24
        real = run_trace(llm, workload).metrics
    finally:
        llm.shutdown()
    summary = planned.summary()
    assert summary["num_preemptions"] == real["num_preemptions"] > 0
    for key in ("num_recomputed_tokens", "num_swapped_out", "batch_size_mean", "kv_waste_mean", "kv_stored_mean"):
        assert summary[key] == real[key], key


def test_the_physics_model_splits_a_step_over_the_ranks_and_adds_their_collectives() -> None:
    gpu = PhysicsCostModel(HARDWARE["h200"], replace(MODEL, dtype_bytes=2, num_parameters=8_000_000_000))
    decode = StepShapeFor(batch=64, context=512)
    one, two = gpu.step_time(decode), gpu.for_engine(2, "auto").step_time(decode)
    assert gpu.for_engine(1, "auto") is gpu and "2 ranks over nvlink" in gpu.for_engine(2, "auto").describe()
    assert one / 2 < two < one  # half the weights a rank, plus the collectives
    # The collectives: 2 all-reduces a layer and the embedding's, and the logits' gather, each at least a latency.
    slow = replace(gpu, link=Link("slow", 1e30, 1e-3)).for_engine(2, "auto")
    fast = replace(gpu, link=Link("free", 1e30, 0.0)).for_engine(2, "auto")
    assert slow.step_time(decode) - fast.step_time(decode) == pytest.approx((2 * MODEL.num_layers + 2) * 1e-3)
    # Past the KV head count each rank still holds one KV head: replicated, not split further.
    assert MODEL.num_kv_heads == 2 and MODEL.kv_bytes_per_token_per_rank(4) == MODEL.kv_bytes_per_token_per_rank(2)


def StepShapeFor(batch: int, context: int) -> StepShape:  # noqa: N802 - reads as the shape it builds
    return StepShape(batch, 0, batch, batch, batch * context, batch * context, batch * context)


def test_a_calibration_times_its_own_rank_count_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvpage.cli import main

    fitted = replace(CalibratedCostModel(tuple([1e-3] + [1e-6] * len(FEATURES)), device="cpu"),
                     tensor_parallel_size=2)
    path = tmp_path / "tp2.json"
    fitted.save(path)
    assert CalibratedCostModel.load(path).tensor_parallel_size == 2 and "2 ranks" in fitted.describe()
    with pytest.raises(ValueError, match="calibrated at tensor_parallel_size=2 and cannot time 1 ranks"):
        replay(synthetic_trace("uniform", 4, None, LIMITS), settings(), fitted, MODEL)
    common = ["plan", "--synthetic", "uniform", "--num", "20", "--kv-tokens", "2048", "--rate-factors", "",
              "--no-layouts", "--json", "--out", str(tmp_path / "out")]
    assert main([*common, "--cost-model", str(path)]) == 0  # its rank count is the default
    assert json.loads(capsys.readouterr().out)["base"]["num_generated_tokens"] > 0
    assert main([*common, "--cost-model", str(path), "-tp", "1"]) == 1
    assert "calibrated at tensor_parallel_size=2" in capsys.readouterr().err
    assert main([*common, "--hardware", "cpu", "-tp", "3"]) == 1  # the demo model's 2 KV heads
    assert "tensor_parallel_size=3 must divide the model's num_key_value_heads=2" in capsys.readouterr().err
    # One TP-2 engine or two TP-1 replicas: the same two devices.
    assert main([*common, "--hardware", "cpu", "--sweep", "tensor_parallel_size=1,2", "replicas=1,2",
                 "--link", "pcie"]) == 0
    points = json.loads(capsys.readouterr().out)["sweep"]
    assert [p["setting"] for p in points] == [{"tensor_parallel_size": t, "replicas": r} for t in (1, 2)
                                              for r in (1, 2)]


def test_replicas_deal_the_trace_round_robin_and_add_up() -> None:
    workload = synthetic_trace("alpaca", 40, None, LIMITS)
    shares = deal(workload, 2)
    assert shares[0].requests == workload.requests[0::2] and shares[1].requests == workload.requests[1::2]
    merged = replay_replicas(workload, settings(2048), CPU, MODEL, 2)
    parts = [replay(share, settings(2048), CPU, MODEL) for share in shares]
    summary = merged.summary()
    assert summary["num_generated_tokens"] == sum(r.output_tokens for r in workload.requests)
    assert summary["num_preemptions"] == sum(p.summary()["num_preemptions"] for p in parts)
    assert merged.duration_s == max(p.duration_s for p in parts) and merged.num_pages == 2 * parts[0].num_pages
    assert len(merged.timings) == 40 and "2 replicas" in merged.cost_model
    # All at once, two engines finish the trace sooner than one with the same memory a device.
    assert merged.duration_s < replay(workload, settings(2048), CPU, MODEL).duration_s
    assert replay_replicas(workload, settings(2048), CPU, MODEL, 1).summary() == \
        replay(workload, settings(2048), CPU, MODEL).summary()
    with pytest.raises(ValueError, match="replicas must be an integer >= 1, got 0"):
        deal(workload, 0)
