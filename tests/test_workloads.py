"""Synthetic workload generators: determinism, bounds, length statistics, arrivals, validation."""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpage.workloads import WORKLOAD_NAMES, Workload, WorkloadSpec, make_workload

REPO_ROOT = Path(__file__).resolve().parent.parent


def _gaps(workload: Workload) -> list[float]:
    times = [r.arrival_time for r in workload.requests]
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_same_spec_same_workload(name: str) -> None:
    spec = WorkloadSpec(name, num_requests=20, seed=7, request_rate=5.0, burstiness=0.5)
    assert make_workload(spec) == make_workload(spec)


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_different_seed_different_workload(name: str) -> None:
    a = make_workload(WorkloadSpec(name, num_requests=20, seed=0, request_rate=5.0))
    b = make_workload(WorkloadSpec(name, num_requests=20, seed=1, request_rate=5.0))
    assert a.requests != b.requests


def test_streams_are_independent_and_prefix_stable() -> None:
    base = make_workload(WorkloadSpec("sharegpt", num_requests=30, seed=3))
    lengths = [(len(r.prompt_token_ids), r.output_tokens) for r in base.requests]
    # Another vocab or rate keeps the lengths; a smaller workload is the start of a larger one.
    other = make_workload(WorkloadSpec("sharegpt", num_requests=30, seed=3, vocab_size=100, request_rate=2.0))
    assert [(len(r.prompt_token_ids), r.output_tokens) for r in other.requests] == lengths
    assert make_workload(WorkloadSpec("sharegpt", num_requests=10, seed=3)).requests == base.requests[:10]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(WORKLOAD_NAMES),
    num_requests=st.integers(1, 16),
    seed=st.integers(0, 2**32),
    max_model_len=st.integers(16, 2048),
    first_token_id=st.integers(0, 10),
    extra_vocab=st.integers(2, 50_000),
    request_rate=st.one_of(st.none(), st.floats(0.01, 1000.0)),
    burstiness=st.floats(0.05, 10.0),
    n=st.integers(1, 4),
)
def test_every_request_within_bounds(name: str, num_requests: int, seed: int, max_model_len: int,
                                     first_token_id: int, extra_vocab: int, request_rate: float | None,
                                     burstiness: float, n: int) -> None:
    vocab_size = first_token_id + extra_vocab
    spec = WorkloadSpec(name, num_requests=num_requests, seed=seed, vocab_size=vocab_size,
                        max_model_len=max_model_len, first_token_id=first_token_id,
                        request_rate=request_rate, burstiness=burstiness, n=n)
    workload = make_workload(spec)
    assert workload.name == name and workload.description
    assert len(workload.requests) == (1 if name == "long-single" else num_requests)
    previous = 0.0
    for r in workload.requests:
        prompt_len = len(r.prompt_token_ids)
        assert prompt_len >= 1 and r.output_tokens >= 1
        assert prompt_len + r.output_tokens <= max_model_len
        assert all(first_token_id <= t < vocab_size for t in r.prompt_token_ids)
        assert r.n == n
        assert 0 <= r.shared_prefix_tokens < prompt_len
        assert r.arrival_time >= previous
        previous = r.arrival_time
    if request_rate is None:
        assert all(r.arrival_time == 0.0 for r in workload.requests)


@pytest.mark.parametrize(("name", "prompt_mean", "output_mean"), [("sharegpt", 161, 338), ("alpaca", 19, 58)])
def test_sample_means_match_the_paper(name: str, prompt_mean: float, output_mean: float) -> None:
    workload = make_workload(WorkloadSpec(name, num_requests=5000, max_model_len=4096))
    assert workload.mean_prompt_tokens == pytest.approx(prompt_mean, rel=0.10)
    assert workload.mean_output_tokens == pytest.approx(output_mean, rel=0.10)
    assert workload.total_prompt_tokens == sum(len(r.prompt_token_ids) for r in workload.requests)
    assert workload.total_output_tokens == sum(r.output_tokens for r in workload.requests)


def test_sharegpt_is_long_tailed() -> None:
    workload = make_workload(WorkloadSpec("sharegpt", num_requests=5000, max_model_len=4096))
    assert max(r.output_tokens for r in workload.requests) > 3 * workload.mean_output_tokens
    assert max(len(r.prompt_token_ids) for r in workload.requests) > 3 * workload.mean_prompt_tokens


def test_uniform_ranges() -> None:
    workload = make_workload(WorkloadSpec("uniform", num_requests=500, max_model_len=1024))
    assert {len(r.prompt_token_ids) for r in workload.requests} <= set(range(64, 257))
    assert {r.output_tokens for r in workload.requests} <= set(range(64, 257))


@pytest.mark.parametrize("max_model_len", [16, 1024, 1025])
def test_long_single_fills_max_model_len(max_model_len: int) -> None:
    workload = make_workload(WorkloadSpec("long-single", num_requests=50, max_model_len=max_model_len))
    (request,) = workload.requests
    assert len(request.prompt_token_ids) == max_model_len // 2
    assert len(request.prompt_token_ids) + request.output_tokens == max_model_len


@pytest.mark.parametrize("max_model_len", [16, 1024, 2048])
def test_shared_prefix_chat_shares_the_system_prompt(max_model_len: int) -> None:
    workload = make_workload(WorkloadSpec("shared-prefix-chat", num_requests=200, max_model_len=max_model_len))
    system = max_model_len // 4
    prefixes = {r.prompt_token_ids[:system] for r in workload.requests}
    assert len(prefixes) == 1
    for r in workload.requests:
        assert r.prefix_group == 0 and r.shared_prefix_tokens == system
        assert system < len(r.prompt_token_ids) <= max_model_len // 2
    # The user parts are random, not copies of one another.
    assert len({r.prompt_token_ids[system:] for r in workload.requests}) > 100


def test_other_workloads_share_no_prefix() -> None:
    workload = make_workload(WorkloadSpec("sharegpt", num_requests=10))
    assert all(r.prefix_group is None and r.shared_prefix_tokens == 0 for r in workload.requests)


@pytest.mark.parametrize("rate", [0.5, 20.0])
def test_arrival_mean_gap_is_inverse_rate(rate: float) -> None:
    workload = make_workload(WorkloadSpec("alpaca", num_requests=5000, request_rate=rate))
    gaps = _gaps(workload)
    assert workload.requests[0].arrival_time == 0.0
    assert all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.15)


def test_no_rate_means_everything_at_zero() -> None:
    workload = make_workload(WorkloadSpec("alpaca", num_requests=100))
    assert all(r.arrival_time == 0.0 for r in workload.requests)


def test_burstiness_below_one_spreads_gaps() -> None:
    def cv(burstiness: float) -> float:
        gaps = _gaps(make_workload(WorkloadSpec("alpaca", num_requests=5000, request_rate=10.0,
                                                burstiness=burstiness)))
        return statistics.stdev(gaps) / statistics.fmean(gaps)

    poisson, bursty = cv(1.0), cv(0.25)
    assert poisson == pytest.approx(1.0, rel=0.1)  # exponential gaps: CV 1
    assert bursty > 1.5 * poisson  # gamma shape 0.25: CV 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "sharegpt2"),
        ("num_requests", 0),
        ("num_requests", True),
        ("seed", 1.5),
        ("vocab_size", 4),
        ("first_token_id", -1),
        ("max_model_len", 15),
        ("request_rate", 0.0),
        ("request_rate", float("inf")),
        ("burstiness", 0),
        ("burstiness", float("nan")),
        ("n", 0),
    ],
)
def test_invalid_spec_names_the_field(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"name": "sharegpt", field: value}
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got "):
        WorkloadSpec(**kwargs)  # type: ignore[arg-type]


def test_error_message_format() -> None:
    with pytest.raises(ValueError, match=r"^num_requests must be an integer >= 1, got 0$"):
        WorkloadSpec("sharegpt", num_requests=0)


def test_imports_without_torch() -> None:
    code = "import sys, kvpage.workloads; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
