"""Waste accounting, the contiguous baseline, admission control and thrashing signals (pure Python)."""

from __future__ import annotations

import logging
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpage.config import SchedulerConfig
from kvpage.kv import Claim, ContiguousKVCacheManager, KVCacheManager, make_kv_manager
from kvpage.sampling_params import SamplingParams
from kvpage.sched.pressure import PressureSample, ThrashingMonitor
from kvpage.sched.scheduler import Scheduler
from kvpage.sched.sequence import Request
from kvpage.step_io import SampledToken


def scheduler(layout: str = "paged", num_pages: int = 64, block_size: int = 4, max_model_len: int = 64,
              **cfg: object) -> Scheduler:
    kv = make_kv_manager(layout, num_pages, block_size, max_model_len)
    return Scheduler(SchedulerConfig(**cfg), kv, max_model_len, eos_token_ids=(2,))


def submit(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int, n: int = 1, arrival: float = 0.0) -> None:
    prompt = [10 + zlib.crc32(rid.encode()) % 50 + i for i in range(prompt_len)]  # stable across processes
    sched.add_request(Request(rid, None, prompt, SamplingParams(n=n, max_tokens=max_tokens, temperature=0,
                                                                ignore_eos=True), arrival_time=arrival))


def step(sched: Scheduler) -> int:
    out = sched.schedule()
    sched.update(out, [SampledToken(7) for s in out.sequences if s.sample])
    return len(out.sequences)


@pytest.mark.parametrize("layout", ["contiguous-request", "contiguous-max"])
def test_a_scheduler_over_a_contiguous_manager_needs_no_layout_argument(layout: str) -> None:
    """The scheduler learns the layout from its manager, so it reserves for growth and decodes past the prompt."""
    kv = ContiguousKVCacheManager(32, 4, layout, max_model_len=64)  # type: ignore[arg-type]
    sched = Scheduler(SchedulerConfig(), kv, 64, eos_token_ids=(2,))
    request = Request("a", None, list(range(10, 15)), SamplingParams(n=2, max_tokens=12, temperature=0,
                                                                       ignore_eos=True), arrival_time=0.0)
    sched.add_request(request)
    reserved = []
    while sched.has_unfinished():
        step(sched)
        reserved.append(sched.kv_waste().reserved_slots)
    assert [len(s.output_token_ids) for s in request.sequences] == [12, 12]
    # After the first step both samples hold their whole runs (prompt + max_tokens - 1 slots, or max_model_len)
    # and have 4 tokens computed (the prompt but its last): the rest is reserved.
    run = 16 if layout == "contiguous-request" else 64
    assert reserved[0] == 2 * (run - 4) and kv.num_pages_in_use == 0


def test_external_fragmentation_follows_the_waiting_queue_as_it_changes() -> None:
    """The smallest pending reservation is kept between steps; it must follow every join and admission."""
    sched = scheduler("contiguous-request", num_pages=24, block_size=4, max_model_len=64)
    for i, (prompt, out) in enumerate([(20, 20), (6, 4), (30, 20), (3, 2), (12, 30), (5, 5), (40, 20), (4, 3)]):
        submit(sched, f"r{i}", prompt, out, arrival=float(i))
    seen = set()
    while sched.has_unfinished():
        step(sched)
        kv, waiting = sched.kv, sched.waiting
        fresh = None
        if waiting:  # computed from scratch, as the cache must have it
            fresh = min(kv.pages_for_tokens(s.num_prompt_tokens + s.request.sampling_params.max_tokens - 1)
                        for s in waiting)
        expected = kv.waste(sched.admission.reserved_pages(), fresh)
        assert sched.kv_waste() == expected
        seen.add((len(waiting), expected.external_slots))
    assert len({n for n, _ in seen if n}) > 2 and any(external for _, external in seen)  # the queue changed


# ----- waste accounting on hand-built cases ---------------------------------------------------
def test_paged_waste_is_the_last_page_slack_and_sharing_is_counted_once() -> None:
    kv = KVCacheManager(10, 4)
    assert kv.allocate(0, 6) == []
    kv.commit(0, list(range(6)), 6)
    waste = kv.waste()
    assert (waste.stored_slots, waste.internal_slots, waste.reserved_slots, waste.external_slots) == (6, 2, 0, 0)
    assert waste.free_slots == 32 and sum(waste.fractions().values()) == pytest.approx(1)
    kv.fork(0, 1)  # a sibling shares both pages: stored once, but the same two pages would be four unshared
    waste = kv.waste(reserved_pages=3)
    assert (waste.stored_slots, waste.pages_in_use, waste.pages_without_sharing) == (6, 2, 4)
    assert waste.sharing_saving == pytest.approx(0.5)
    assert waste.reserved_slots == 12 and waste.waste_fraction == pytest.approx((2 + 12) / 40)


def test_contiguous_waste_by_kind_and_hole_merging() -> None:
    kv = ContiguousKVCacheManager(10, 4)
    assert kv.allocate(0, 5, Claim(12)) == []  # pages 0-2
    kv.commit(0, [], 5)
    assert kv.allocate(1, 8, Claim(8)) == []  # pages 3-4
    kv.commit(1, [], 8)
    assert kv.page_ids(0) == [0, 1, 2] and kv.page_ids(1) == [3, 4]
    waste = kv.waste()
    # A: 5 stored, 3 slack in its second page, its third page reserved; B: full, nothing wasted.
    assert (waste.stored_slots, waste.internal_slots, waste.reserved_slots, waste.external_slots) == (13, 3, 4, 0)
    kv.free(0)  # holes: pages 0-2 (3 pages) and 5-9 (5 pages)
    assert kv.num_available_pages == 5
    waste = kv.waste(min_pending_pages=4)  # the 3-page hole is too small for anyone waiting
    assert waste.external_slots == 12 and waste.free_slots == 40 - 8 - 12
    assert kv.allocate(2, 1, Claim(20)) == []  # first fit: 5 pages at 5-9, not the 3-page hole
    assert kv.page_ids(2) == [5, 6, 7, 8, 9]
    assert kv.allocate(3, 1, Claim(16)) is None  # 3 free pages, but no 4 in a row
    kv.free(1)
    kv.free(2)
    assert kv.num_available_pages == 10 and kv.num_pages_in_use == 0  # the holes merged back into one


def test_contiguous_forks_copy_the_prompt_into_reservations_taken_at_admission() -> None:
    kv = ContiguousKVCacheManager(12, 4)
    assert kv.allocate(0, 6, Claim(10, 3)) == []  # 3 x 3 pages, all at once
    assert kv.num_pages_in_use == 9
    kv.commit(0, [], 6)
    kv.fork(0, 1)
    kv.fork(0, 2)
    copies = {child: kv.allocate(child, 1) for child in (1, 2)}
    starts = {child: kv.page_ids(child)[0] for child in (1, 2)}
    for child in (1, 2):  # both pages holding the prompt are copied into the child's own run
        assert copies[child] == [(0, starts[child]), (1, starts[child] + 1)]
    assert kv.allocate(3, 1, Claim(16)) is None  # only 3 pages left
    for seq in (0, 1, 2):
        kv.free(seq)
    assert kv.num_pages_in_use == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), max_size=40))
def test_contiguous_holes_never_overlap_and_always_merge(ops: list[tuple[bool, int]]) -> None:
    kv = ContiguousKVCacheManager(24, 2)
    live: list[int] = []
    for i, (alloc, pages) in enumerate(ops):
        if alloc or not live:
            if kv.allocate(i, 1, Claim(2 * pages)) is not None:
                live.append(i)
        else:
            kv.free(live.pop(pages % len(live)))
        owned = sorted(p for seq in live for p in kv.page_ids(seq))
        assert len(owned) == len(set(owned)) == kv.num_pages_in_use
        holes = kv._holes
        assert all(a[0] + a[1] < b[0] for a, b in zip(holes, holes[1:]))  # sorted, disjoint, never adjacent
        assert sum(length for _, length in holes) + len(owned) == 24
    for seq in live:
        kv.free(seq)
    assert kv._holes == [(0, 24)]


# ----- layouts through the scheduler --------------------------------------------------------
@pytest.mark.parametrize("layout", ["paged", "contiguous-request", "contiguous-max"])
def test_layouts_run_to_completion_and_free_everything(layout: str) -> None:
    sched = scheduler(layout, num_pages=40, max_model_len=64)
    for i in range(8):
        submit(sched, f"r{i}", 5 + 3 * i, 6 + i, n=2 if i % 3 == 0 else 1)
    batches = []
    while sched.has_unfinished():
        batches.append(step(sched))
        waste = sched.kv_waste()
        assert sum(waste.fractions().values()) == pytest.approx(1)
        assert waste.free_slots >= 0
    assert sched.kv.num_pages_in_use == 0 and max(batches) >= 2


def test_contiguous_max_admits_fewer_at_once_than_paged() -> None:
    peaks = {}
    for layout in ("paged", "contiguous-request", "contiguous-max"):
        sched = scheduler(layout, num_pages=64, block_size=4, max_model_len=128, headroom_policy="none")
        for i in range(12):
            submit(sched, f"r{i}", 8, 8)
        peaks[layout] = max(step(sched) for _ in range(40))
    # 12 requests of 8 + 8 tokens: paging holds them all (2-4 pages each), a prompt + max_tokens reservation
    # (4 pages) too, but a max_model_len reservation (32 pages) only two.
    assert peaks == {"paged": 12, "contiguous-request": 12, "contiguous-max": 2}


def test_contiguous_external_fragmentation_is_seen_by_the_waiting_queue() -> None:
    sched = scheduler("contiguous-request", num_pages=10, block_size=4, max_model_len=40, headroom_policy="none")
    submit(sched, "a", 4, 9, arrival=0)    # 12 slots: 3 pages
    submit(sched, "b", 4, 5, arrival=1)    # 8 slots: 2 pages
    submit(sched, "c", 4, 13, arrival=2)   # 16 slots: 4 pages
    submit(sched, "d", 8, 13, arrival=3)   # 20 slots: 5 pages, waits
    step(sched)
    assert sched.kv.num_pages_in_use == 9
    while "b" in sched.requests:  # b finishes first and leaves a 2-page hole between a and c
        step(sched)
    waste = sched.kv_waste()
    assert waste.external_slots == (2 + 1) * 4  # the 2-page hole and the last page: both too small for d


# ----- admission control ---------------------------------------------------------------------
def test_conservative_policy_never_preempts() -> None:
    for policy, expect_preemptions in (("none", True), ("conservative", False)):
        sched = scheduler("paged", num_pages=24, block_size=4, max_model_len=64, headroom_policy=policy)
        for i in range(10):
            submit(sched, f"r{i}", 6, 30, arrival=i)
        while sched.has_unfinished():
            step(sched)
            assert sched.admission.promised_pages >= sched.kv.num_pages_in_use or policy == "none"
        assert (sched.counters.num_preemptions > 0) == expect_preemptions, policy
        assert sched.kv.num_pages_in_use == 0 and sched.admission.promised_pages == 0
    assert sched.admission.counters.headroom > 0


def test_admission_cap_delays_requests_and_bounds_conservative_use() -> None:
    for policy in ("watermark", "conservative"):
        sched = scheduler("paged", num_pages=40, block_size=4, max_model_len=64, admission_cap=0.5,
                          headroom_policy=policy)
        for i in range(12):
            submit(sched, f"r{i}", 10, 10, arrival=i)
        while sched.has_unfinished():
            step(sched)
            if policy == "conservative":  # every admitted request's largest size fits under the cap
                assert sched.kv.num_pages_in_use <= sched.admission.promised_pages <= 20
        assert sched.admission.counters.admission_cap > 0, policy
        assert sched.kv.num_pages_in_use == 0


def test_cap_bounds_usage_right_after_each_admission() -> None:
    sched = scheduler("paged", num_pages=40, block_size=4, max_model_len=64, admission_cap=0.5,
                      headroom_policy="none", max_num_batched_tokens=1000)
    for i in range(12):
        submit(sched, f"r{i}", 10, 10, arrival=i)
    while sched.has_unfinished():
        running_before = {s.seq_id for s in sched.running}
        step(sched)
        newly_admitted = {s.seq_id for s in sched.running} - running_before
        if newly_admitted and running_before:
            assert sched.kv.num_pages_in_use <= 20  # admitted only while the prompt kept use within the cap


def test_requests_larger_than_the_cap_are_refused_at_submission() -> None:
    sched = scheduler("paged", num_pages=20, block_size=4, max_model_len=64, admission_cap=0.5,
                      headroom_policy="conservative")
    with pytest.raises(ValueError, match="admission_cap 0.5 allows 10 of 20"):
        submit(sched, "big", 20, 30)
    sched = scheduler("contiguous-max", num_pages=20, block_size=4, max_model_len=128)
    with pytest.raises(ValueError, match="32 KV pages"):
        submit(sched, "any", 4, 4)


def test_max_num_seqs_delays_are_counted_once_per_request() -> None:
    sched = scheduler("paged", num_pages=64, max_num_seqs=2)
    for i in range(5):
        submit(sched, f"r{i}", 4, 6, arrival=i)
    while sched.has_unfinished():
        step(sched)
    # The rules judge the head of the queue: r2 waits at the head for the first pair, r4 for the
    # second (r3 is admitted beside r2 as soon as it reaches the head). Each counts once, however long.
    assert sched.admission.counters.max_num_seqs == 2


def test_watermark_keeps_pages_free_for_growth() -> None:
    preemptions = {}
    for policy in ("none", "watermark"):
        sched = scheduler("paged", num_pages=32, block_size=4, max_model_len=64, headroom_policy=policy,
                          watermark=0.25)
        for i in range(16):
            submit(sched, f"r{i}", 8, 24, arrival=i)
        while sched.has_unfinished():
            step(sched)
        preemptions[policy] = sched.counters.num_preemptions
    assert preemptions["watermark"] < preemptions["none"] / 2  # measured: 9 against 23


# ----- thrashing --------------------------------------------------------------------------------
def test_thrashing_monitor_warns_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    monitor = ThrashingMonitor(window_s=10, recompute_threshold=0.2, min_tokens=100)
    with caplog.at_level(logging.WARNING, logger="kvpage.engine"):
        for t in range(10):  # 40% of the computed tokens are recomputation
            monitor.add(PressureSample(t, evictions=2 * t, preemptions=t, recomputed_tokens=40 * t,
                                       computed_tokens=100 * t, generated_tokens=50 * t))
    assert monitor.is_thrashing and monitor.num_warnings == 1
    assert "lower admission_cap" in caplog.text.lower() or "Lower admission_cap" in caplog.text
    rates = monitor.rates()
    assert rates["recompute_fraction"] == pytest.approx(0.4) and rates["preemptions_per_s"] == pytest.approx(1)
    assert rates["goodput_tokens_per_s"] == pytest.approx(50) and rates["throughput_tokens_per_s"] == pytest.approx(100)
    for t in range(10, 40):  # no more recomputation: the window forgets it
        monitor.add(PressureSample(t, 18, 9, 360, 100 * t, 50 * t))
    assert not monitor.is_thrashing and monitor.num_warnings == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 3), min_size=1, max_size=40), st.lists(st.floats(0, 3), min_size=1, max_size=40),
       st.integers(0, 2))
def test_a_quiet_run_builds_only_the_samples_its_window_keeps(before: list[float], gaps: list[float],
                                                                recomputed_before: int) -> None:
    """What the planner's flush does (quiet, kept_from, extend of the tail) leaves the window as adding every sample."""
    def samples(gaps: list[float], start: float, recomputed: int) -> list[PressureSample]:
        times = [start + sum(gaps[:i + 1]) for i in range(len(gaps))]
        return [PressureSample(t, i, 0, recomputed, 10 * i, 5 * i) for i, t in enumerate(times)]
    history = samples(before, 0.0, 0)
    history[-1] = history[-1]._replace(recomputed_tokens=recomputed_before)
    run = samples(gaps, history[-1].time, recomputed_before)
    one_by_one, at_once = ThrashingMonitor(window_s=5, warn=False), ThrashingMonitor(window_s=5, warn=False)
    for sample in history:
        one_by_one.add(sample)
        at_once.add(sample)
    for sample in run:
        one_by_one.add(sample)
    quiet = at_once.quiet(recomputed_before)
    kept = at_once.kept_from(run, lambda sample: sample.time) if quiet else 0
    at_once.extend(run[kept:])
    assert list(at_once.samples) == list(one_by_one.samples)
    assert at_once.is_thrashing == one_by_one.is_thrashing
    if quiet:  # and it builds no sample that the window drops
        first = one_by_one.samples[0]
        assert kept == next((i for i, sample in enumerate(run) if sample is first), 0)


# ----- swap -----------------------------------------------------------------------------------
def test_swap_round_trip_keeps_the_accounting() -> None:
    kv = KVCacheManager(8, 4, num_swap_pages=4)
    assert kv.allocate(0, 10) == []
    kv.commit(0, list(range(10)), 10)
    device_pages = list(kv.page_ids(0))
    out = kv.swap_out(0)
    assert out is not None and [d for d, _ in out] == device_pages and len({h for _, h in out}) == 3
    assert kv.num_pages_in_use == 0 and kv.swap_space.num_free_pages == 1 and not kv.has_sequence(0)
    assert kv.allocate(1, 16) == []
    kv.commit(1, list(range(100, 116)), 16)
    assert kv.swap_out(1) is None and kv.has_sequence(1)  # 4 pages, the swap space has 1: nothing changes
    kv.free(1)
    back = kv.swap_in(0)
    assert back is not None and [h for h, _ in back] == [h for _, h in out]
    assert kv.page_ids(0) == [d for _, d in back] and kv.swap_space.num_free_pages == 4
    assert kv.waste().stored_slots == 10 and kv.pages_needed(0, 2) == 0  # resumes mid-page, no copy-on-write
    assert kv.swap_out(0) is not None
    kv.free(0)  # an aborted swapped sequence gives its host pages back
    assert kv.swap_space.num_free_pages == 4 and kv.num_pages_in_use == 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_swap_preemption_resumes_without_recomputing(mode: str) -> None:
    kv = KVCacheManager(24, 4, num_swap_pages=64)
    sched = Scheduler(SchedulerConfig(preemption_mode=mode, headroom_policy="none"), kv, 64, eos_token_ids=(2,))
    for i in range(8):
        submit(sched, f"r{i}", 8, 24, arrival=i)
    while sched.has_unfinished():
        step(sched)
        assert kv.num_pages_in_use + kv.swap_space.num_free_pages <= 24 + 64
    counters = sched.counters
    assert counters.num_preemptions > 0
    if mode == "swap":
        assert counters.num_swapped_out == counters.num_preemptions == counters.num_swapped_in
        assert counters.num_recomputed_tokens == 0
    else:
        assert counters.num_swapped_out == 0 and counters.num_recomputed_tokens > 0
    assert kv.num_pages_in_use == 0 and kv.swap_space.num_free_pages == 64


def test_swap_falls_back_to_recompute_when_host_memory_is_full() -> None:
    kv = KVCacheManager(24, 4, num_swap_pages=3)
    sched = Scheduler(SchedulerConfig(preemption_mode="swap", headroom_policy="none"), kv, 64, eos_token_ids=(2,))
    for i in range(8):
        submit(sched, f"r{i}", 8, 24, arrival=i)
    while sched.has_unfinished():
        step(sched)
    assert sched.counters.num_recomputed_tokens > 0 and sched.counters.num_swapped_out < sched.counters.num_preemptions
    assert kv.swap_space.num_free_pages == 3


def test_auto_swaps_long_contexts_and_recomputes_short_ones() -> None:
    from kvpage.sched.preemption import SwapCostModel

    # A 1B-parameter Llama on a GPU: 16 layers, 8 KV heads of 64, bf16, pages of 16 tokens.
    cost = SwapCostModel.for_device("cuda", num_parameters=1_000_000_000, bytes_per_page=2 * 16 * 16 * 8 * 64 * 2,
                                    num_layers=16, num_heads=32, head_dim=64)
    assert not cost.prefer_swap(16, 1)  # one page of context: recomputing beats a round trip's latency
    assert cost.prefer_swap(1024, 64)  # a long context: moving 64 pages beats recomputing 1024 tokens
    tiny = SwapCostModel.for_device("cuda", num_parameters=11_000_000, bytes_per_page=2 * 6 * 16 * 2 * 64 * 2,
                                    num_layers=6, num_heads=6, head_dim=64)
    assert not tiny.prefer_swap(1024, 64)  # the demo model recomputes a whole context in microseconds
    cpu = SwapCostModel.for_device("cpu", num_parameters=11_000_000, bytes_per_page=2 * 6 * 16 * 2 * 64 * 4,
                                   num_layers=6, num_heads=6, head_dim=64)
    assert cpu.prefer_swap(64, 4)  # on a CPU compute is dear and "host memory" is the same memory
