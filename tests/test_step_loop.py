"""The engine and the planner share one step loop: driven by the same adversarial script, they schedule alike.

The engine runs the built-in model through its real runner; the planner's
side is the scheduler the replay builds (``build_scheduler``) on its
virtual device.  Both get the replay's "sampled" tokens (the engine's real
ones are swapped for them after each step), so the schedule cannot depend
on what the model writes.  The script adds requests (plain, ``n = 2``
samples, beam searches; shared prompt stems for prefix hits; two
priorities) and aborts some, also while a step is in flight, in a cache
small enough to preempt; every step of both sides must be the same
(sequences and tokens, page operations in order, preemptions, finishes).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from kvpage.engine import LLMEngine
from kvpage.model import demo_model_dir
from kvpage.plan.cost import HARDWARE, ModelShape, PhysicsCostModel
from kvpage.plan.fast_forward import FIRST_FAKE_TOKEN
from kvpage.plan.replay import ReplaySettings, VirtualDevice, _fake_tokens, build_scheduler
from kvpage.sampling_params import SamplingParams
from kvpage.sched import Request, StepLoop
from kvpage.sched.step_loop import Executor
from kvpage.step_io import SampledToken, SchedulerOutput

VOCAB = 4096
MAX_MODEL_LEN = 128
MODEL = ModelShape.from_config(demo_model_dir() / "config.json", dtype_bytes=4)


def signature(out: SchedulerOutput) -> tuple[Any, ...]:
    return (tuple((s.seq_id, s.start_position, len(s.input_token_ids), s.sample) for s in out.sequences),
            tuple((ops.kind.value, tuple(ops.pairs)) for ops in out.page_ops), tuple(out.preempted_seq_ids),
            tuple(sorted(out.finished_seq_ids)))


class Recording:
    """Wraps an executor: logs every launched step, and hands back the replay's tokens instead of its own."""

    def __init__(self, inner: Executor[Any]) -> None:
        self.inner = inner
        self.log: list[tuple[Any, ...]] = []

    def launch(self, out: SchedulerOutput, previous: tuple[SchedulerOutput, Any] | None) -> tuple[SchedulerOutput, Any]:
        self.log.append(signature(out))
        return out, self.inner.launch(out, previous[1] if previous is not None else None)

    def wait(self, handle: tuple[SchedulerOutput, Any]) -> list[SampledToken]:
        self.inner.wait(handle[1])
        # The replay's sampled ids lie above the vocabulary; the engine's model gets them folded into it.
        return [replace(token, token_id=in_vocab(token.token_id)) for token in _fake_tokens(handle[0], VOCAB)]


def in_vocab(token_id: int) -> int:
    return token_id if token_id < VOCAB else FIRST_FAKE_TOKEN + (token_id - VOCAB) % (VOCAB - FIRST_FAKE_TOKEN)


def script(seed: int, num_steps: int = 70) -> list[list[tuple[str, Any]]]:
    """Per step, the events before it: ("add", (request id, prompt, params, priority)) or ("abort", request id)."""
    rng = random.Random(seed)
    stems = [[rng.randrange(3, VOCAB) for _ in range(40)] for _ in range(3)]
    steps: list[list[tuple[str, Any]]] = []
    added = 0
    for _ in range(num_steps):
        events: list[tuple[str, Any]] = []
        if rng.random() < 0.3:
            prompt = stems[rng.randrange(3)][: rng.randint(4, 40)] + [rng.randrange(3, VOCAB)
                                                                      for _ in range(rng.randint(0, 12))]
            kind, max_tokens = rng.choice(["plain", "plain", "samples", "beam"]), rng.randint(1, 20)
            if kind == "beam":
                params = SamplingParams(n=2, use_beam_search=True, beam_width=rng.choice([2, 3]), temperature=0.0,
                                        max_tokens=max_tokens, ignore_eos=True)
            else:
                params = SamplingParams(n=2 if kind == "samples" else 1, temperature=1.0, seed=added,
                                        max_tokens=max_tokens, ignore_eos=True)
            events.append(("add", (f"r{added}", prompt, params, rng.choice([0, 0, 1]))))
            added += 1
        if added and rng.random() < 0.08:
            events.append(("abort", f"r{rng.randrange(added)}"))
        steps.append(events)
    return steps


def check_in_flight(loop: StepLoop[Any, Any]) -> None:
    """Only a step that runs sequences stays in flight: one without has nothing to overlap with."""
    assert loop.in_flight is None or loop.in_flight.out.sequences


def run_engine(events: list[list[tuple[str, Any]]], options: dict[str, Any], num_pages: int = 40
               ) -> tuple[list[Any], int]:
    engine = LLMEngine.from_kwargs(model=None, device="cpu", block_size=4, num_kv_blocks=num_pages,
                                   max_model_len=MAX_MODEL_LEN, headroom_policy="none", **options)
    recording = Recording(engine.loop.executor)
    engine.loop.executor = recording
    aborts_in_flight = 0
    for before in events:
        for kind, what in before:
            if kind == "add":
                rid, prompt, params, priority = what
                engine.add_request(rid, {"prompt_token_ids": prompt}, params, priority=priority)
            else:
                aborts_in_flight += engine.abort_request(what) and engine.loop.in_flight is not None
        engine.step()
        check_in_flight(engine.loop)
    for _ in range(3000):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        check_in_flight(engine.loop)
    assert not engine.has_unfinished_requests() and engine.kv.num_pages_in_use == 0
    return recording.log, aborts_in_flight


def run_planner(events: list[list[tuple[str, Any]]], options: dict[str, Any], num_pages: int = 40) -> list[Any]:
    settings = ReplaySettings(options={"block_size": 4, "headroom_policy": "none", **options}, kv_tokens=num_pages * 4,
                              max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB, device_type="cpu")
    sched, _, bytes_per_page = build_scheduler(settings, MODEL)
    recording = Recording(VirtualDevice(PhysicsCostModel(HARDWARE["cpu"], MODEL), bytes_per_page, VOCAB))
    loop: StepLoop[Any, None] = StepLoop(sched, recording, settings.async_scheduling, lambda out, touched: [])
    for i, before in enumerate(events):
        for kind, what in before:
            if kind == "add":
                rid, prompt, params, priority = what
                sched.add_request(Request(rid, None, list(prompt), params, arrival_time=float(i), priority=priority))
            else:
                sched.abort_request(what)
        loop.step()
        check_in_flight(loop)
    for _ in range(3000):
        if not loop.has_unfinished():
            break
        loop.step()
        check_in_flight(loop)
    assert not loop.has_unfinished() and sched.kv.num_pages_in_use == 0
    return recording.log


def count(log: list[Any]) -> Counter[str]:
    return Counter({"empty steps": sum(not seqs and not ops for seqs, ops, *_ in log),
                    "page operations alone": sum(not seqs and bool(ops) for seqs, ops, *_ in log),
                    "preemptions": sum(len(preempted) for *_, preempted, _ in log),
                    "swaps": sum(kind == "swap_out" for _, ops, *_ in log for kind, _ in ops),
                    "forks": sum(kind == "copy" for _, ops, *_ in log for kind, _ in ops)})


@pytest.mark.parametrize("options", [{"async_scheduling": False, "preemption_mode": "recompute"},
                                     {"async_scheduling": True, "preemption_mode": "recompute"},
                                     {"async_scheduling": True, "preemption_mode": "swap", "swap_space": 0.001}],
                         ids=["sync", "async", "async-swap"])
def test_engine_and_planner_take_the_same_steps(options: dict[str, Any]) -> None:
    seen: Counter[str] = Counter()
    for seed in range(3):
        events = script(seed)
        engine_log, aborts_in_flight = run_engine(events, options)
        planner_log = run_planner(events, options)
        assert len(engine_log) == len(planner_log), seed
        for i, (ours, theirs) in enumerate(zip(engine_log, planner_log)):
            assert ours == theirs, f"seed {seed}: step {i} differs"
        seen += count(engine_log)
        seen["aborts in flight"] += aborts_in_flight
    # The script meant something: preemption under pressure, empty steps, copy-on-write of samples and beams.
    assert seen["preemptions"] > 0 and seen["empty steps"] > 0 and seen["forks"] > 0, seen
    if options["async_scheduling"]:
        assert seen["aborts in flight"] > 0, seen
    if options["preemption_mode"] == "swap":
        assert seen["swaps"] > 0, seen


def test_a_step_of_page_operations_alone_completes_at_once_in_both() -> None:
    """Asynchronous, swapping: the older request has its last token in flight, the younger needs a page.

    The younger is swapped out and nothing runs: a step of page operations
    alone.  It completes at once in the engine; the planner's replay once
    kept it in flight and charged step time for it.
    """
    prompts = [([3 + j for j in range(4)], 6), ([10 + j for j in range(11)], 9)]
    events = [[("add", (f"r{i}", prompt, SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0), 0))
               for i, (prompt, m) in enumerate(prompts)]]
    options = {"async_scheduling": True, "preemption_mode": "swap", "swap_space": 0.001}
    engine_log, _ = run_engine(events, options, num_pages=7)
    assert count(engine_log)["page operations alone"] > 0
    assert engine_log == run_planner(events, options, num_pages=7)
