"""Asynchronous scheduling changes when the host works, never what the engine produces.

Each case runs the same requests with ``async_scheduling`` off and on (on a
CPU the device is synchronous, but the code path is the one a GPU takes:
steps planned while the previous one is "in flight", in-flight inputs filled
in from its output tensor, tokens resolved a step later); on a GPU the same
tests run with CUDA graphs and a truly asynchronous device. Greedy outputs must
equal transformers', seeded samples must equal the synchronous engine's, and
every page must be back in the pool. The runner is instrumented to prove the
overlap actually happened: some step must have run with in-flight inputs.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvpage import LLM, LLMEngine, SamplingParams
from kvpage.worker.model_runner import ModelRunner, StepInputs
from tests.checkpoints import hf_greedy, make_checkpoint

VOCAB = 256
DEMO_MODEL = Path(__file__).resolve().parents[1] / "kvpage" / "assets" / "demo-model"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=21, vocab_size=VOCAB)


@pytest.fixture
def inflight_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many in-flight inputs each launched step had."""
    counts: list[int] = []
    original = ModelRunner.launch

    def counting(self: ModelRunner, out, inputs: StepInputs | None, previous=None):  # noqa: ANN001, ANN202
        counts.append(len(inputs.inflight_rows) if inputs is not None else 0)
        return original(self, out, inputs, previous)

    monkeypatch.setattr(ModelRunner, "launch", counting)
    return counts


def batch(seed: int, num: int = 12, shared: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(shared)]
    prompts = [prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 70))] for _ in range(num)]
    return prompts, [rng.randint(1, 24) for _ in prompts]


def generate(model_dir: Path, prompts: list[list[int]], params: list[SamplingParams], **options: object) -> LLM:
    llm = LLM(model=str(model_dir), dtype="float32", **options)
    llm.last_outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.get_metrics()["kv_blocks_used"] == 0
    assert not llm.engine.has_unfinished_requests()
    return llm


CASES = {
    "plain": {},
    "prefix hits, chunked prefill": {"max_num_batched_tokens": 37, "block_size": 8},
    "preemption by recompute": {"num_kv_blocks": 24, "block_size": 4, "headroom_policy": "none"},
    "preemption by swap": {"num_kv_blocks": 24, "block_size": 4, "headroom_policy": "none",
                           "preemption_mode": "swap", "swap_space": 0.01},
    "contiguous layout": {"kv_layout": "contiguous-request", "num_kv_blocks": 64, "block_size": 8},
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_outputs_equal_transformers(llama: Path, case: str, inflight_rows: list[int]) -> None:
    prompts, max_tokens = batch(seed=1, shared=20 if "prefix" in case else 0)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    llm = generate(llama, prompts, params, async_scheduling=True, max_num_seqs=6, **CASES[case])
    for prompt, m, out in zip(prompts, max_tokens, llm.last_outputs):
        assert out.outputs[0].token_ids == hf_greedy(llama, prompt, m)
    assert sum(inflight_rows) > 0, "no step ran with in-flight inputs: nothing overlapped"
    metrics = llm.get_metrics()
    if "preemption" in case:
        assert metrics["num_preemptions"] > 0
    if "swap" in case:
        assert metrics["num_swapped_out"] > 0
    if "prefix" in case:
        assert metrics["prefix_cache_hits"] > 0


def test_early_stops_waste_one_token_and_change_nothing(llama: Path, inflight_rows: list[int]) -> None:
    """Stop tokens end sequences a step after their next step was launched; that step's token is dropped."""
    prompts, max_tokens = batch(seed=2)
    reference = generate(llama, prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                          for m in max_tokens]).last_outputs
    # Stop on the third token of each greedy output: known to come, mid-way through the run.
    stops = [out.outputs[0].token_ids[2] for out in reference if len(out.outputs[0].token_ids) > 3]
    params = [SamplingParams(temperature=0, max_tokens=m, stop_token_ids=stops[:4]) for m in max_tokens]
    sync = generate(llama, prompts, params, async_scheduling=False, max_num_seqs=6).last_outputs
    overlapped = generate(llama, prompts, params, async_scheduling=True, max_num_seqs=6).last_outputs
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in sync]
    assert [o.outputs[0].finish_reason for o in overlapped] == [o.outputs[0].finish_reason for o in sync]
    assert sum(o.outputs[0].finish_reason == "stop" for o in sync) >= 4
    assert sum(inflight_rows) > 0


def test_seeded_samples_siblings_and_logprobs_equal_the_synchronous_engine(llama: Path) -> None:
    prompts, max_tokens = batch(seed=3, num=8, shared=16)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_tokens=m, ignore_eos=True, n=2, seed=i,
                             logprobs=2) for i, m in enumerate(max_tokens)]
    sync = generate(llama, prompts, params, async_scheduling=False, max_num_seqs=5).last_outputs
    overlapped = generate(llama, prompts, params, async_scheduling=True, max_num_seqs=5).last_outputs
    for a, b in zip(sync, overlapped):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        # Batches are composed a little differently (a finished request's seat frees a step later),
        # so float32 logprobs agree to rounding, not bit for bit.
        for x, y in zip(a.outputs, b.outputs):
            assert [sorted(d) for d in x.logprobs] == [sorted(d) for d in y.logprobs]
            assert all(v == pytest.approx(d[k], abs=1e-4) for d, e in zip(x.logprobs, y.logprobs) for k, v in e.items())


def test_steps_that_need_host_tokens_are_waited_for(llama: Path, inflight_rows: list[int]) -> None:
    """Penalties, min_tokens and beam search read the output on the host: no step overlaps them."""
    prompts, max_tokens = batch(seed=4, num=6)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.5, min_tokens=min(m, 3)) for m in max_tokens]
    sync = generate(llama, prompts, params, async_scheduling=False).last_outputs
    overlapped = generate(llama, prompts, params, async_scheduling=True).last_outputs
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in sync]
    beams = [SamplingParams(use_beam_search=True, beam_width=3, temperature=0, max_tokens=8, ignore_eos=True)] * 3
    assert ([c.token_ids for o in generate(llama, prompts[:3], beams, async_scheduling=True).last_outputs
             for c in o.outputs]
            == [c.token_ids for o in generate(llama, prompts[:3], beams, async_scheduling=False).last_outputs
                for c in o.outputs])
    assert sum(inflight_rows) == 0


def test_generated_pages_are_indexed_once_their_tokens_are_known(llama: Path) -> None:
    """A page filled while its last token was in flight enters the prefix cache when that token resolves."""
    prompts, _ = batch(seed=5, num=4)
    llm = LLM(model=str(llama), dtype="float32", async_scheduling=True, block_size=4)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0, max_tokens=21, ignore_eos=True), use_tqdm=False)
    # Follow-ups whose prompt is the whole first exchange hit the pages holding its generated tokens.
    follow_ups = [p + out.outputs[0].token_ids for p, out in zip(prompts, first)]
    second = llm.generate([{"prompt_token_ids": p} for p in follow_ups],
                          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(follow_ups, second):
        # Every full page but the one holding the last prompt token: the generated ones included.
        assert out.num_cached_tokens == (len(prompt) - 1) // 4 * 4
        assert out.outputs[0].token_ids == hf_greedy(llama, prompt, 5)
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_abort_while_a_step_is_in_flight(llama: Path) -> None:
    engine = LLMEngine.from_kwargs(model=str(llama), dtype="float32", async_scheduling=True, block_size=4)
    prompts, _ = batch(seed=6, num=5)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    finished = {}
    for step in range(60):
        if step == 6:
            assert engine._in_flight is not None
            engine.abort_request(["r1", "r3"])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert sorted(finished) == ["r0", "r2", "r4"]
    for i in (0, 2, 4):
        assert finished[f"r{i}"].outputs[0].token_ids == hf_greedy(llama, prompts[i], 30)
    assert engine.get_metrics()["kv_blocks_used"] == 0


def test_the_engine_goes_idle_once_its_last_request_finishes(llama: Path, inflight_rows: list[int]) -> None:
    """Driven step by step, as the server loop and trace runs drive it: no step stays "in flight" forever.

    The last requests finish by length in the step in flight, so the step after plans nothing; that
    step must leave the engine idle, or the server's loop would spin on an engine with nothing to do.
    """
    engine = LLMEngine.from_kwargs(model=str(llama), dtype="float32", async_scheduling=True, block_size=4)
    prompts, max_tokens = batch(seed=8, num=4)
    for round_ in range(2):  # and it serves the next requests after going idle
        for i, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
            engine.add_request(f"r{round_}-{i}", {"prompt_token_ids": prompt},
                               SamplingParams(temperature=0, max_tokens=limit, ignore_eos=True))
        finished = {}
        for _ in range(200):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            if len(finished) == len(prompts):
                break
        assert len(finished) == len(prompts)
        assert not engine.has_unfinished_requests()
        for i, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
            assert finished[f"r{round_}-{i}"].outputs[0].token_ids == hf_greedy(llama, prompt, limit)
        assert engine.get_metrics()["kv_blocks_used"] == 0
    assert any(inflight_rows)


def test_the_server_loop_sleeps_once_its_requests_are_done(llama: Path) -> None:
    """The serving loop steps only while there is work: an idle asynchronous engine is not stepped."""
    import asyncio
    import time

    pytest.importorskip("prometheus_client", reason="the serving loop needs the serve extra")
    from kvpage.server.async_engine import AsyncEngine

    engine = LLMEngine.from_kwargs(model=str(llama), dtype="float32", async_scheduling=True, block_size=4)
    server = AsyncEngine(engine)
    prompts, _ = batch(seed=9, num=3)

    async def one(prompt: list[int]) -> list[int]:
        handle = await server.submit({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=9,
                                                                                  ignore_eos=True))
        return [t async for delta in handle.deltas() for completion in delta.completions
                for t in completion.token_ids]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        outputs = asyncio.run(run())
        assert outputs == [hf_greedy(llama, p, 9) for p in prompts]
        time.sleep(0.2)  # the loop applies the last step and goes idle
        steps = engine.timings.num_steps
        time.sleep(0.3)
        assert engine.timings.num_steps == steps
        assert not engine.has_unfinished_requests()
        assert engine.get_metrics()["kv_blocks_used"] == 0
    finally:
        server.shutdown()


@pytest.mark.skipif(not DEMO_MODEL.is_dir(), reason="no shipped demo model")
def test_stop_strings_cut_the_same_text() -> None:
    prompts = ["And God said", "In the beginning", "And the LORD spake unto Moses"]
    params = [SamplingParams(temperature=0, max_tokens=40, stop=[","]),
              SamplingParams(temperature=0, max_tokens=40, stop=["earth", " and "]),
              SamplingParams(temperature=0.7, seed=3, max_tokens=40, stop=["."])]
    texts = {}
    for mode in (False, True):
        llm = LLM(async_scheduling=mode, dtype="float32")
        texts[mode] = [(o.outputs[0].text, o.outputs[0].finish_reason) for o in llm.generate(prompts, params,
                                                                                              use_tqdm=False)]
        assert llm.get_metrics()["kv_blocks_used"] == 0
    assert texts[True] == texts[False]
    assert sum(reason == "stop" for _, reason in texts[True]) >= 2
