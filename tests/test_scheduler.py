"""The scheduler alone (pure Python), driven by a fake model that always samples token 7."""

from __future__ import annotations

import pytest

from kvpage.config import SchedulerConfig
from kvpage.kv import KVCacheManager
from kvpage.sampling_params import SamplingParams
from kvpage.sched.scheduler import Scheduler
from kvpage.sched.sequence import Request, SequenceStatus
from kvpage.step_io import SampledToken, SchedulerOutput


def make(num_pages: int = 64, block_size: int = 4, max_model_len: int = 256, caching: bool = True,
         **cfg: int) -> Scheduler:
    kv = KVCacheManager(num_pages, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(**cfg), kv, max_model_len, eos_token_ids=(2,))


def submit(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int, *, n: int = 1, priority: int = 0,
           arrival: float = 0.0, first_token: int = 10) -> Request:
    prompt = [first_token + i for i in range(prompt_len)]
    req = Request(rid, None, prompt, SamplingParams(n=n, max_tokens=max_tokens, temperature=0),
                  arrival_time=arrival, priority=priority)
    sched.add_request(req)
    return req


def step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sched.update(out, [SampledToken(7) for s in out.sequences if s.sample])
    return out


def run_all(sched: Scheduler, limit: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished() and len(outs) < limit:
        outs.append(step(sched))
    assert not sched.has_unfinished()
    return outs


def test_token_and_sequence_budgets_hold_every_step() -> None:
    sched = make(num_pages=256, max_num_batched_tokens=20, max_num_seqs=3)
    for i in range(6):
        submit(sched, f"r{i}", 17 + i, 5, arrival=i)
    for out in run_all(sched):
        assert out.num_batched_tokens <= 20
        assert len(out.sequences) <= 3
    assert sched.kv.usage().num_pages_used == 0


def test_chunked_prefill_runs_beside_decodes() -> None:
    sched = make(num_pages=256, max_num_batched_tokens=16)
    submit(sched, "short", 4, 20, arrival=0)
    step(sched)  # prefill of the short one
    submit(sched, "long", 50, 3, arrival=1, first_token=100)
    out = step(sched)
    kinds = {s.seq_id: len(s.input_token_ids) for s in out.sequences}
    assert kinds[0] == 1 and kinds[1] == 15  # one decode token + a 15-token chunk of the long prompt
    assert not out.sequences[1].sample
    outs = run_all(sched)
    assert sum(len(s.input_token_ids) for o in outs for s in o.sequences if s.seq_id == 1) == 50 - 15 + 2


def test_priority_then_arrival_order() -> None:
    sched = make(num_pages=256, max_num_seqs=1)
    submit(sched, "late-low", 4, 1, arrival=0, priority=5)
    submit(sched, "early", 4, 1, arrival=1)
    submit(sched, "urgent", 4, 1, arrival=2, priority=-1)
    order = []
    for out in run_all(sched):
        order += [sched_seq.seq_id for sched_seq in out.sequences]
    assert order == [2, 1, 0]


@pytest.mark.parametrize("caching", [False, True])
def test_preempts_the_latest_admitted_and_requeues_it_first(caching: bool) -> None:
    sched = make(num_pages=6, block_size=4, caching=caching)
    a = submit(sched, "a", 8, 12, arrival=0)
    b = submit(sched, "b", 8, 12, arrival=1)
    preempted = []
    for out in run_all(sched):
        preempted += out.preempted_seq_ids
    assert sched.counters.num_preemptions >= 1
    assert preempted[0] == b.sequences[0].seq_id  # b came after a
    # Preemption strikes when a sequence needs a new page, so its pages are all full; with
    # prefix caching they survive as cached-free pages and nothing needs recomputing.
    assert (sched.counters.num_recomputed_tokens > 0) != caching
    for req in (a, b):
        assert req.sequences[0].status is SequenceStatus.FINISHED_LENGTH
    assert sched.kv.usage().num_pages_used == 0


def test_refuses_requests_that_can_never_fit() -> None:
    sched = make(num_pages=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        submit(sched, "x", 60, 10)
    with pytest.raises(ValueError, match="max_model_len"):
        submit(sched, "y", 64, 1)
    with pytest.raises(ValueError, match="KV pages"):
        submit(sched, "z", 10, 10)  # 19 tokens of K/V need 5 pages, the cache has 4
    submit(sched, "ok", 10, 7)  # 16 tokens fit exactly
    assert not sched.waiting[0].request.request_id != "ok"
    run_all(sched)


def test_parallel_samples_fork_after_the_prompt() -> None:
    sched = make(num_pages=64, block_size=4)
    req = submit(sched, "n4", 10, 3, n=4)
    out = step(sched)
    assert [len(s.input_token_ids) for s in out.sequences] == [9]  # all but the last prompt token
    assert len(req.sequences) == 4
    shared = sched.kv.page_ids(req.sequences[0].seq_id)[:2]
    for seq in req.sequences[1:]:
        assert sched.kv.page_ids(seq.seq_id)[:2] == shared
    out = step(sched)
    assert len(out.sequences) == 4 and all(s.sample for s in out.sequences)
    # Each writes the last prompt token into the shared partial page: three copies, the last writer keeps it.
    assert len(out.pairs("copy")) == 3
    run_all(sched)
    assert all(len(s.output_token_ids) == 3 for s in req.sequences)
    assert sched.kv.usage().num_pages_used == 0


def test_abort_frees_pages() -> None:
    sched = make(num_pages=64)
    submit(sched, "a", 30, 50)
    step(sched)
    assert sched.kv.usage().num_pages_used > 0
    sched.abort_request("a")
    assert sched.kv.usage().num_pages_used == 0 and not sched.has_unfinished()


def test_urgent_request_preempts_lower_priority_work() -> None:
    sched = make(num_pages=8, block_size=4, max_num_seqs=2)
    low_a = submit(sched, "low-a", 10, 12, arrival=0, priority=5)
    low_b = submit(sched, "low-b", 10, 12, arrival=1, priority=5)
    step(sched)
    step(sched)
    urgent = submit(sched, "urgent", 10, 3, arrival=2, priority=0)
    out = step(sched)
    # Both slots were taken by priority-5 work: the latest admitted one gives way in this very step.
    assert out.preempted_seq_ids == [low_b.sequences[0].seq_id]
    assert urgent.sequences[0].seq_id in [s.seq_id for s in out.sequences]
    assert low_b.sequences[0].seq_id not in [s.seq_id for s in out.sequences]
    finish_order = []
    while sched.has_unfinished():
        step(sched)
        for req in (low_a, low_b, urgent):
            if req.is_finished and req.request_id not in finish_order:
                finish_order.append(req.request_id)
    assert finish_order[0] == "urgent"
    assert sched.kv.usage().num_pages_used == 0


def test_equal_priority_never_preempts_to_admit() -> None:
    sched = make(num_pages=8, block_size=4, max_num_seqs=1)
    submit(sched, "first", 10, 12, arrival=0)
    step(sched)
    submit(sched, "second", 10, 3, arrival=1)
    assert step(sched).preempted_seq_ids == []
