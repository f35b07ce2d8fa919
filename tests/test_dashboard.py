"""The KV page map's data: page states against the managers' own counts, frames, events, timelines, offline pages.

The browser half is tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpage import LLM, SamplingParams
from kvpage.dashboard import Timeline, offline_page
from kvpage.dashboard.timeline import MAX_FRAMES
from kvpage.kv import Claim, ContiguousKVCacheManager, KVCacheManager
from kvpage.kv.page_map import CACHED, FRAGMENT, FREE, RESERVED, SHARED, USED


def check_paged(kv: KVCacheManager) -> str:
    """The page map's states agree with the pool, page by page."""
    states = kv.page_map().states()
    usage, pool = kv.usage(), kv.pool
    counts = Counter(states)
    assert counts[USED] + counts[SHARED] == usage.num_pages_used
    assert counts[CACHED] == usage.num_pages_cached_free
    assert counts[FREE] == usage.num_pages_free
    for page in pool.pages:
        expected = {0: CACHED if page.content_hash is not None else FREE, 1: USED}.get(page.ref_count, SHARED)
        assert states[page.page_id] == expected, (page, states)
    return states


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "grow", "fork", "free", "swap"]), st.integers(0, 7),
                          st.integers(1, 40)), max_size=40))
def test_paged_page_map_matches_the_pool(ops: list[tuple[str, int, int]]) -> None:
    kv = KVCacheManager(num_pages=24, block_size=4, num_swap_pages=16)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9][: 4 + i % 5] for i in range(8)]
    tokens: dict[int, list[int]] = {}
    swapped: set[int] = set()
    next_id = 0
    for op, pick, count in ops:
        live = sorted(tokens)
        if op == "new" or not live:
            seq, prompt = next_id, prompts[pick]
            next_id += 1
            hit = kv.find_cached_prefix(prompt)
            if kv.allocate(seq, len(prompt) - hit.num_tokens, Claim(len(prompt) + 8, hit=hit)) is not None:
                kv.commit(seq, prompt, len(prompt))
                tokens[seq] = list(prompt)
            continue
        seq = live[pick % len(live)]
        if seq in swapped:
            if op == "swap" and kv.swap_in(seq) is not None:
                swapped.discard(seq)
            elif op == "free":
                kv.free(seq)
                del tokens[seq]
                swapped.discard(seq)
        elif op == "grow":
            new = [100 + seq] * (count % 6 + 1)
            if kv.allocate(seq, len(new)) is not None:
                tokens[seq] += new
                kv.commit(seq, tokens[seq], len(tokens[seq]))
        elif op == "fork":
            kv.fork(seq, next_id)
            tokens[next_id] = list(tokens[seq])
            next_id += 1
        elif op == "free":
            kv.free(seq)
            del tokens[seq]
        elif op == "swap" and kv.swap_out(seq) is not None:
            swapped.add(seq)
        check_paged(kv)
    page_map = kv.page_map()
    assert set(page_map.host) == swapped
    for seq in swapped:
        assert len(page_map.host[seq]) == kv.swapped_pages(seq)
    for seq, pages in page_map.tables.items():
        assert pages == kv.page_ids(seq)


def test_copy_on_write_is_recorded_where_it_happened() -> None:
    kv = KVCacheManager(num_pages=8, block_size=4)
    kv.allocate(0, 6, Claim(10))
    kv.commit(0, [1, 2, 3, 4, 5, 6], 6)
    kv.fork(0, 1)
    assert check_paged(kv).count(SHARED) == 2
    copies = kv.allocate(1, 1)  # writes into the shared, partly filled second page
    assert copies and kv.page_map().copied == {1: [1]}
    assert check_paged(kv).count(SHARED) == 1  # the full first page is still shared


def test_contiguous_page_map_shows_reservations_and_holes() -> None:
    kv = ContiguousKVCacheManager(num_pages=12, block_size=4)
    for seq, full in enumerate((8, 16, 8)):  # runs of 2, 4 and 2 pages
        kv.allocate(seq, 4, Claim(full))
        kv.commit(seq, [1] * 4, 4)
    kv.free(1)  # a hole of 4 pages between the two others, and 4 free at the end
    page_map = kv.page_map(min_pending_pages=5)
    assert page_map.states() == USED + RESERVED + FRAGMENT * 4 + USED + RESERVED + FRAGMENT * 4
    assert kv.page_map(min_pending_pages=4).states() == USED + RESERVED + FREE * 4 + USED + RESERVED + FREE * 4
    assert kv.page_map().states().count(FREE) == kv.usage().num_pages_free


@pytest.fixture(scope="module")
def pressured() -> LLM:
    """A demo-model engine after a run that shares a prefix, forks samples and preempts by recompute."""
    llm = LLM(device="cpu", num_kv_blocks=16, block_size=16, max_model_len=256)
    engine = llm.engine
    prefix = "The quick brown fox jumps over the lazy dog. " * 4
    for i in range(6):
        engine.add_request(f"r{i}", prefix + f"Story {i}:", SamplingParams(max_tokens=60, ignore_eos=True, n=1 + i % 2,
                                                                           temperature=0.8, seed=i))
    frames = []
    while engine.has_unfinished_requests():
        engine.step()
        frames.append(engine.frame().to_json())
    llm.frames = frames  # type: ignore[attr-defined]
    return llm


def check_paged_frame(frame: dict[str, Any]) -> None:
    """A paged frame's pages agree with its counters and its sequences' page tables."""
    states, metrics, block = frame["pages"], frame["metrics"], frame["block_size"]
    assert len(states) == metrics["kv_blocks_total"]
    assert states.count("u") + states.count("s") == metrics["kv_blocks_used"]
    assert states.count("c") == metrics["kv_blocks_cached"] == len(frame["lru"])
    holders = Counter(page for seq in frame["sequences"] for page in seq["pages"])
    assert {p for p, n in holders.items() if n > 1} == {i for i, c in enumerate(states) if c == "s"}
    assert {p for p in holders} == {i for i, c in enumerate(states) if c in "us"}
    for seq in frame["sequences"]:
        assert len(seq["pages"]) * block >= seq["computed"]
        assert all(0 <= index < len(seq["pages"]) for index in seq["copied"])
        assert (seq["status"] == "running") == bool(seq["pages"])
    json.dumps(frame)  # plain JSON


def test_frames_agree_with_the_engine(pressured: LLM) -> None:
    frames: list[dict[str, Any]] = pressured.frames  # type: ignore[attr-defined]
    assert any("s" in f["pages"] for f in frames), "no frame shows a shared page"
    assert any(f["events"]["preemptions"] for f in frames), "no preemption was recorded"
    for frame in frames:
        assert frame["metrics"]["kv_blocks_total"] == 16
        check_paged_frame(frame)
    assert pressured.engine.kv.num_pages_in_use == 0


def test_preemption_events_name_victim_mode_tokens_and_reason() -> None:
    llm = LLM(device="cpu", num_kv_blocks=10, block_size=16, max_model_len=256, preemption_mode="swap", swap_space=0.01)
    engine = llm.engine
    for i in range(4):
        engine.add_request(f"r{i}", f"Request {i} asks for a long answer, please.",
                           SamplingParams(max_tokens=70, ignore_eos=True))
    computed_before: dict[int, int] = {}
    while engine.has_unfinished_requests():
        computed_before = {seq.seq_id: seq.num_computed_tokens for seq in engine.scheduler.running}
        seen = len(engine.scheduler.life.events.preemptions)
        engine.step()
        for event in list(engine.scheduler.life.events.preemptions)[seen:]:
            # Tokens lost or swapped: what the victim had computed when the step began (it may have run first).
            assert event.tokens >= computed_before[event.seq_id] > 0
            assert event.request_id == f"r{event.seq_id}"
            assert event.mode in ("swap", "recompute")
            assert re.fullmatch(r"pages for seq \d+'s next tokens", event.reason)
    events = list(engine.scheduler.life.events.preemptions)
    counters = engine.scheduler.counters
    assert len(events) == counters.num_preemptions > 0
    assert sum(e.mode == "swap" for e in events) == counters.num_swapped_out > 0


def test_delay_events_match_the_delay_counters(pressured: LLM) -> None:
    engine = pressured.engine
    delays = list(engine.scheduler.life.events.delays)
    counters = engine.scheduler.admission.counters
    assert delays, "the pressured run delayed no admission"
    assert Counter(e.rule for e in delays) == Counter({rule: getattr(counters, rule) for rule in
                                                      ("headroom", "pages", "max_num_seqs", "admission_cap")
                                                      if getattr(counters, rule)})
    last = pressured.frames[-1]["events"]  # type: ignore[attr-defined]
    assert last["delay_counts"] == {rule: getattr(counters, rule) for rule in last["delay_counts"]}
    assert [d["request"] for d in last["delays"]] == [e.request_id for e in reversed(delays)][:len(last["delays"])]


class FakeFrame:
    def __init__(self, i: int) -> None:
        self.i = i

    def to_json(self) -> dict[str, Any]:
        return {"step": self.i}


def test_timeline_thins_evenly_and_keeps_the_onset() -> None:
    timeline = Timeline("run")
    made = []

    def make(i: int) -> Any:
        made.append(i)
        return FakeFrame(i)

    for i in range(10_000):
        timeline.offer(i >= 7777, lambda i=i: make(i))  # type: ignore[misc]
    steps = [f["step"] for f in timeline.frames]
    assert MAX_FRAMES // 2 <= len(steps) <= MAX_FRAMES + 1
    assert 7777 in steps  # the verdict changed there
    gaps = Counter(b - a for a, b in zip(steps, steps[1:]) if 7777 not in (a, b))
    assert len(gaps) == 1  # evenly spread apart from the onset
    assert len(made) < 10_000 // 10  # frames are made only when kept


def test_offline_page_embeds_its_data_safely() -> None:
    frames = [{"step": 1, "prompt": "</script><script>alert(1)</script><!--"}]
    html = offline_page("a <b>title</b>", [("run", frames)])
    match = re.search(r'<script id="kvpage-timeline" type="application/json">(.*?)</script>', html, re.S)
    assert match is not None
    assert json.loads(match.group(1)) == {"title": "a <b>title</b>", "runs": [{"name": "run", "frames": frames}]}
    assert "<script src=" not in html and 'rel="stylesheet"' not in html  # nothing to fetch: all inlined


def test_plan_html_writes_a_page_per_layout(tmp_path: Path) -> None:
    from kvpage.cli import main

    out = tmp_path / "plan"
    assert main(["plan", "--synthetic", "sharegpt", "--num", "40", "--kv-tokens", "2048", "--rate", "40",
                 "--rate-factors", "", "--html", "--out", str(out)]) == 0
    timeline = _timeline(out / "dashboard.html")
    assert [run["name"] for run in timeline["runs"]] == ["paged", "contiguous-request", "contiguous-max"]
    for run in timeline["runs"]:
        frames = run["frames"]
        assert 10 <= len(frames) <= MAX_FRAMES + 1
        assert all(f["layout"] == run["name"] for f in frames)
        assert frames[-1]["metrics"]["kv_blocks_used"] == 0 or frames[-1]["sequences"]
    contiguous = timeline["runs"][1]["frames"]
    assert any("r" in f["pages"] for f in contiguous) and any("x" in f["pages"] for f in contiguous)


def _timeline(path: Path) -> dict[str, Any]:
    html = path.read_text()
    match = re.search(r'<script id="kvpage-timeline" type="application/json">(.*?)</script>', html, re.S)
    assert match is not None
    data: dict[str, Any] = json.loads(match.group(1))
    return data


def test_bench_html_records_every_case(tmp_path: Path) -> None:
    from kvpage.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--workloads", "alpaca", "--num-requests", "6", "--kv-tokens", "256", "--max-model-len",
                 "256", "--sharing-n", "2", "--beam-widths", "2", "--sharing-requests", "2", "--device", "cpu",
                 "--preemption-modes", "swap", "--html", "--out", str(out)]) == 0
    timeline = _timeline(out / "dashboard.html")
    names = [run["name"] for run in timeline["runs"]]
    assert names == ["alpaca / paged", "alpaca / contiguous-request", "alpaca / contiguous-max",
                     "alpaca / paged, swap", "alpaca / paged, n=2", "alpaca / paged, beam width 2",
                     "sharegpt / paged, n=2", "sharegpt / paged, beam width 2"]
    for run in timeline["runs"]:
        frames = run["frames"]
        assert frames and [f["step"] for f in frames] == sorted(f["step"] for f in frames)
        for frame in frames:
            states, metrics = frame["pages"], frame["metrics"]
            assert sum(states.count(c) for c in "usr") == metrics["kv_blocks_used"]
            assert states.count(".") + states.count("x") + states.count("c") == \
                metrics["kv_blocks_free"] + metrics["kv_blocks_cached"]
    swap = timeline["runs"][3]["frames"]
    assert any(seq["host"] for f in swap for seq in f["sequences"]), "the swap run shows no swapped sequence"
    for run in timeline["runs"][4:]:  # samples and beams share their parents' pages
        assert any("s" in f["pages"] for f in run["frames"]), run["name"]


@pytest.mark.parametrize("layout", ["contiguous-request", "contiguous-max"])
def test_contiguous_frames_hold_the_samples_runs(layout: str) -> None:
    """A parent's runs for samples not forked yet are reserved pages of its request, not free ones."""
    llm = LLM(device="cpu", num_kv_blocks=40, block_size=16, max_model_len=128, kv_layout=layout,
              max_num_batched_tokens=16)  # the prompt takes steps: the samples fork after them
    engine = llm.engine
    engine.add_request("a", "In the beginning " * 6, SamplingParams(n=3, max_tokens=20, temperature=1.0, seed=1))
    spare_seen = False
    while engine.has_unfinished_requests():
        engine.step()
        frame = engine.frame().to_json()
        states, metrics = frame["pages"], frame["metrics"]
        assert sum(states.count(c) for c in "usr") == metrics["kv_blocks_used"]
        owned = [p for seq in frame["sequences"] for p in seq["pages"] + seq.get("spare", [])]
        assert len(owned) == len(set(owned)) == metrics["kv_blocks_used"]  # every run belongs to a sequence
        spare_seen |= any(seq.get("spare") for seq in frame["sequences"])
    assert spare_seen


def test_a_long_queue_is_counted_but_not_all_listed() -> None:
    from kvpage.dashboard.frame import WAITING_SHOWN

    llm = LLM(device="cpu", num_kv_blocks=8, block_size=16, max_model_len=64, max_num_seqs=2)
    engine = llm.engine
    for i in range(WAITING_SHOWN + 40):
        engine.add_request(f"q{i}", [5, 6, 7], SamplingParams(max_tokens=2))
    engine.step()
    frame = engine.frame().to_json()
    waiting = [seq["request"] for seq in frame["sequences"] if seq["status"] == "waiting"]
    assert len(waiting) == WAITING_SHOWN < frame["metrics"]["num_requests_waiting"] == WAITING_SHOWN + 38
    assert waiting == [f"q{i}" for i in range(2, WAITING_SHOWN + 2)]  # the head of the queue
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    assert engine.kv.num_pages_in_use == 0
