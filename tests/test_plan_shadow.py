"""Layout shadows give the layout comparison exactly what full replays of each layout give (kvpage.plan.shadow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpage.plan.cost import HARDWARE, ModelShape, PhysicsCostModel
from kvpage.plan.replay import ReplaySettings, replay
from kvpage.plan.sweep import layout_savings
from kvpage.plan.trace import TraceLimits, parse_trace, synthetic_trace
from kvpage.workloads import Workload

DEMO = Path(__file__).resolve().parent.parent / "kvpage" / "assets" / "demo-model"
LIMITS = TraceLimits(max_model_len=1024, vocab_size=4096)
MODEL = ModelShape.from_config(DEMO / "config.json", dtype_bytes=4)
H100 = PhysicsCostModel(HARDWARE["h100"], MODEL)
CONTIGUOUS = ("contiguous-request", "contiguous-max")


def settings(kv_tokens: int, **options: object) -> ReplaySettings:
    return ReplaySettings(options={"block_size": 16, **options}, kv_tokens=kv_tokens, max_model_len=1024,
                          vocab_size=4096, device_type="cpu")


def forks(num: int) -> Workload:
    lines = [json.dumps({"arrival_time": i * 0.01, "prompt_tokens": 30 + i % 50, "output_tokens": 20 + i % 90,
                         "n": 2 if i % 4 == 0 else 1}) for i in range(num)]
    return parse_trace(lines, LIMITS)


# Where every layout admits each request when paging does, and nothing is shared: the shadows hold.
HOLDING = {
    "sharegpt": (synthetic_trace("sharegpt", 300, 40.0, LIMITS), settings(65536)),
    "alpaca, bursty": (synthetic_trace("alpaca", 300, 80.0, LIMITS, burstiness=0.3), settings(65536)),
    "block_size 64": (synthetic_trace("sharegpt", 200, 40.0, LIMITS), settings(65536, block_size=64)),
    "block_size 1": (synthetic_trace("alpaca", 100, 40.0, LIMITS),  # (one-token pages would hit by chance)
                     settings(65536, block_size=1, enable_prefix_caching=False)),
    "conservative": (synthetic_trace("sharegpt", 200, 40.0, LIMITS), settings(65536, headroom_policy="conservative")),
    "no prefix caching, shared prefixes": (synthetic_trace("shared-prefix-chat", 150, 40.0, LIMITS),
                                           settings(65536, enable_prefix_caching=False)),
    "asynchronous order": (synthetic_trace("sharegpt", 150, 40.0, LIMITS), settings(65536, async_scheduling=True)),
}

# Where the schedules part for some layout: the shadow must notice, and the layout is replayed in full.
PARTING = {
    "contiguous-max runs out of holes": (synthetic_trace("sharegpt", 200, 40.0, LIMITS), settings(16384),
                                         {"contiguous-max"}),
    "prefix hits": (synthetic_trace("shared-prefix-chat", 150, 40.0, LIMITS), settings(65536), set(CONTIGUOUS)),
    "n > 1": (forks(120), settings(65536), set(CONTIGUOUS)),
    "pressure": (synthetic_trace("sharegpt", 200, 40.0, LIMITS), settings(2048, headroom_policy="none"),
                 set(CONTIGUOUS)),
    "requests wait for a seat": (synthetic_trace("sharegpt", 150, 40.0, LIMITS), settings(65536, max_num_seqs=4),
                                 set(CONTIGUOUS)),
}


def full_comparison(workload: Workload, replay_settings: ReplaySettings) -> dict[str, dict[str, float]]:
    return layout_savings(workload, replay_settings, H100, MODEL, base=replay(workload, replay_settings, H100, MODEL))


@pytest.mark.parametrize("name", list(HOLDING))
def test_shadows_give_what_full_replays_give(name: str) -> None:
    workload, replay_settings = HOLDING[name]
    base = replay(workload, replay_settings, H100, MODEL, shadow_layouts=CONTIGUOUS)
    assert {layout: result.broken for layout, result in base.shadows.items()} == dict.fromkeys(CONTIGUOUS)
    assert layout_savings(workload, replay_settings, H100, MODEL, base=base) == \
        full_comparison(workload, replay_settings)
    # The comparison means something: each contiguous layout wastes memory that paging does not (the
    # conservative policy holds back for paging what contiguous-request reserves).
    waste = {layout: row["kv_waste_mean"] for layout, row in full_comparison(workload, replay_settings).items()}
    assert waste["paged"] <= waste["contiguous-request"] < waste["contiguous-max"]
    assert waste["paged"] < waste["contiguous-request"] or name == "conservative"


@pytest.mark.parametrize("name", list(PARTING))
def test_a_shadow_breaks_where_its_layout_would_schedule_otherwise(name: str) -> None:
    workload, replay_settings, parting = PARTING[name]
    base = replay(workload, replay_settings, H100, MODEL, shadow_layouts=CONTIGUOUS)
    assert {layout for layout, result in base.shadows.items() if result.broken} == parting
    assert layout_savings(workload, replay_settings, H100, MODEL, base=base) == \
        full_comparison(workload, replay_settings)


def test_shadows_follow_only_a_paged_replay() -> None:
    workload, _ = HOLDING["sharegpt"]
    with pytest.raises(ValueError, match="follow a paged replay"):
        replay(workload, settings(65536, kv_layout="contiguous-request"), H100, MODEL, shadow_layouts=CONTIGUOUS)
