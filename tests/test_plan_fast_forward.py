"""The replay's decode fast-forward is exact: whole replays, stepped and fast-forwarded, agree value for value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import kvpage.plan.replay as replay_module
from kvpage.plan.cost import HARDWARE, ModelShape, PhysicsCostModel
from kvpage.plan.fast_forward import fake_token, fake_token_ids
from kvpage.plan.replay import ReplayResult, ReplaySettings, replay
from kvpage.plan.trace import TraceLimits, parse_trace, synthetic_trace
from kvpage.workloads import Workload

DEMO = Path(__file__).resolve().parent.parent / "kvpage" / "assets" / "demo-model"
LIMITS = TraceLimits(max_model_len=1024, vocab_size=4096)
MODEL = ModelShape.from_config(DEMO / "config.json", dtype_bytes=4)
H100 = PhysicsCostModel(HARDWARE["h100"], MODEL)  # short steps: many decode-only steps between arrivals


def settings(kv_tokens: int, **options: object) -> ReplaySettings:
    return ReplaySettings(options={"block_size": 16, **options}, kv_tokens=kv_tokens, max_model_len=1024,
                          vocab_size=4096, device_type="cpu")


def samples_and_beams(num: int, beams: bool = True) -> Workload:
    """Requests with n > 1 and (if ``beams``) beam searches, some of a shared-prefix group, arriving over time."""
    lines = []
    for i in range(num):
        line = {"arrival_time": i * 0.002, "prompt_tokens": 20 + (i * 37) % 90, "output_tokens": 30 + (i * 53) % 200}
        if i % 3 == 0:
            line["n"] = 2 + i % 2
        if beams and i % 7 == 0:
            line["beam_width"] = 3
        if i % 4 == 1:
            line.update(prefix_group=i % 3, shared_prefix_tokens=16)
        lines.append(json.dumps(line))
    return parse_trace(lines, LIMITS)


def whole_page_samples(num: int) -> Workload:
    """n = 2 requests whose prompts fill whole pages: their samples fork with no page to copy."""
    lines = [json.dumps({"arrival_time": i * 0.003, "prompt_tokens": 16 * (1 + i % 4), "output_tokens": 20 + i % 60,
                         "n": 2 if i % 2 else 1}) for i in range(num)]
    return parse_trace(lines, LIMITS)


def priorities(num: int) -> Workload:
    """Later requests more urgent than earlier ones (a lower value): admitting one displaces a running one."""
    lines = [json.dumps({"arrival_time": i * 0.03, "prompt_tokens": 20 + (i * 29) % 70,
                         "output_tokens": 150 + (i * 31) % 100, "priority": -i}) for i in range(num)]
    return parse_trace(lines, LIMITS)


CASES = {
    "sharegpt": (synthetic_trace("sharegpt", 200, 40.0, LIMITS), settings(16384)),
    "preemption by recompute": (synthetic_trace("sharegpt", 200, 40.0, LIMITS),
                                settings(2048, headroom_policy="none")),
    "preemption by swap": (synthetic_trace("sharegpt", 200, 40.0, LIMITS),
                           settings(2048, headroom_policy="none", preemption_mode="swap", swap_space=0.01)),
    "prefix caching": (synthetic_trace("shared-prefix-chat", 200, 40.0, LIMITS), settings(4096)),
    "no prefix caching": (synthetic_trace("shared-prefix-chat", 100, 40.0, LIMITS),
                          settings(4096, enable_prefix_caching=False)),
    "conservative": (synthetic_trace("sharegpt", 200, 40.0, LIMITS), settings(4096, headroom_policy="conservative")),
    "n > 1 and beams": (samples_and_beams(80), settings(4096)),
    "n > 1, prompts of whole pages": (whole_page_samples(80), settings(16384)),
    "priority preemption": (priorities(60), settings(16384, max_num_seqs=4)),
    "n > 1 and beams under pressure": (samples_and_beams(80), settings(1024, headroom_policy="none")),
    "block_size 1": (synthetic_trace("alpaca", 100, 40.0, LIMITS), settings(4096, block_size=1)),
    "block_size 64, max_num_seqs 8": (synthetic_trace("sharegpt", 100, 40.0, LIMITS),
                                      settings(8192, block_size=64, max_num_seqs=8)),
    "contiguous": (synthetic_trace("sharegpt", 200, 40.0, LIMITS), settings(65536, kv_layout="contiguous-request")),
    "contiguous-max": (synthetic_trace("sharegpt", 100, 40.0, LIMITS), settings(65536, kv_layout="contiguous-max")),
    "contiguous, requests waiting": (synthetic_trace("sharegpt", 100, 40.0, LIMITS),
                                  settings(4096, kv_layout="contiguous-request", headroom_policy="none")),
    "contiguous n > 1": (samples_and_beams(60, beams=False), settings(16384, kv_layout="contiguous-request")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_forward_replays_exactly_what_stepping_replays(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    workload, replay_settings = CASES[name]
    stepped = replay(workload, replay_settings, H100, MODEL, fast=False)
    fast_steps, all_steps = [0], [0]
    real_fast_forward, real_step = replay_module.fast_forward, replay_module.StepRecorder.step
    real_flush = replay_module.StepRecorder.flush

    def counting_fast_forward(*args: Any) -> tuple[float, int]:
        now, steps = real_fast_forward(*args)
        fast_steps[0] += steps
        return now, steps

    def counting_step(*args: Any) -> None:
        all_steps[0] += 1
        real_step(*args)

    def counting_flush(recorder: Any, *args: Any) -> None:  # a decode run's steps, recorded at once
        all_steps[0] += len(recorder.buffered)
        real_flush(recorder, *args)

    monkeypatch.setattr(replay_module, "fast_forward", counting_fast_forward)
    monkeypatch.setattr(replay_module.StepRecorder, "step", counting_step)
    monkeypatch.setattr(replay_module.StepRecorder, "flush", counting_flush)
    fast = replay(workload, replay_settings, H100, MODEL)
    assert_same(stepped, fast)
    # Each case means something: the fast-forward ran (most steps, where nothing keeps requests waiting) ...
    assert fast_steps[0] > (0.8 if name in FREE_FLOWING else 0.05) * all_steps[0]
    # ... and what it had to get right happened.
    summary = stepped.summary()
    if "pressure" in name or "preemption" in name:
        assert summary["num_preemptions"] > 0
    if "swap" in name:
        assert summary["num_swapped_out"] > 0
    if name == "prefix caching":
        assert summary["num_evictions"] > 0 and summary["kv_sharing_saving_mean"] > 0
    if name == "conservative" or "contiguous" in name:
        assert summary["kv_reservation_waste_mean"] > 0
    if name == "contiguous, requests waiting":  # admission waits for a hole, the holes left are too small
        assert summary["batch_size_mean_loaded"] > 0 and summary["kv_external_fragmentation_mean"] > 0


FREE_FLOWING = ("sharegpt", "prefix caching", "no prefix caching", "block_size 1", "contiguous", "contiguous-max")


def assert_same(stepped: ReplayResult, fast: ReplayResult) -> None:
    a, b = stepped.summary(), fast.summary()
    assert a.keys() == b.keys()
    assert {k: a[k] for k in a if a[k] != b[k]} == {}, {k: b[k] for k in a if a[k] != b[k]}
    assert stepped.series == fast.series
    assert stepped.timings == fast.timings


def test_fake_tokens_lie_outside_the_vocabulary_and_differ_by_sequence() -> None:
    seq_ids = (0, 7, 128_252, 10**6)
    assert len({fake_token(seq_id, 4096) for seq_id in seq_ids}) == len(seq_ids)
    for seq_id in seq_ids:
        assert fake_token(seq_id, 4096) >= 4096
        for count in (0, 1, 35):
            assert fake_token_ids(seq_id, count, 4096) == [fake_token(seq_id, 4096)] * count
