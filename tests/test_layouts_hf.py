"""The contiguous baselines and the admission policies leave greedy outputs identical to transformers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvpage import LLM, SamplingParams
from tests.checkpoints import make_checkpoint
from tests.test_engine_hf import VOCAB, mixed_batch, reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("layouts") / "llama", "llama", seed=11, vocab_size=VOCAB)


def generate(llm: LLM, prompts: list[list[int]], max_tokens: list[int], n: int = 1) -> list:
    params = [SamplingParams(n=n, temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def check(model_dir: Path, llm: LLM, prompts: list[list[int]], max_tokens: list[int], n: int = 1) -> None:
    for i, (prompt, m, out) in enumerate(zip(prompts, max_tokens, generate(llm, prompts, max_tokens, n))):
        expected = reference(model_dir, tuple(prompt), m)
        assert [c.token_ids for c in out.outputs] == [expected] * n, f"prompt {i} diverged"
    assert llm.engine.kv.num_pages_in_use == 0


@pytest.mark.parametrize("layout", ["contiguous-request", "contiguous-max"])
def test_contiguous_layouts_match_transformers(model_dir: Path, layout: str) -> None:
    prompts, max_tokens = mixed_batch(seed=21)
    # Room for about three max_model_len reservations: contiguous-max must queue, not fail.
    llm = LLM(model=str(model_dir), block_size=16, kv_layout=layout, max_model_len=512, num_kv_blocks=100)
    check(model_dir, llm, prompts, max_tokens)
    metrics = llm.get_metrics()
    assert metrics["batch_size_max"] <= (3 if layout == "contiguous-max" else 16)
    assert metrics["kv_reservation_waste_mean"] > 0 and metrics["num_preemptions"] == 0
    assert metrics["prefix_cache_hits"] == 0


def test_contiguous_forks_copy_the_prompt(model_dir: Path) -> None:
    prompts, max_tokens = mixed_batch(seed=22)
    llm = LLM(model=str(model_dir), block_size=16, kv_layout="contiguous-request", max_model_len=512)
    check(model_dir, llm, prompts[:5], max_tokens[:5], n=3)


def test_conservative_admission_never_preempts_and_matches(model_dir: Path) -> None:
    prompts, max_tokens = mixed_batch(seed=23, max_new=64)
    counts = {}
    for policy in ("none", "conservative"):
        llm = LLM(model=str(model_dir), block_size=8, num_kv_blocks=(300 + 64) // 8 + 8, max_model_len=512,
                  headroom_policy=policy)
        check(model_dir, llm, prompts, max_tokens)
        counts[policy] = llm.get_metrics()
    assert counts["none"]["num_preemptions"] > 0 and counts["conservative"]["num_preemptions"] == 0
    assert counts["conservative"]["num_requests_delayed_headroom"] > 0
    assert counts["conservative"]["kv_reservation_waste_mean"] > 0 == counts["none"]["kv_reservation_waste_mean"]


def test_thrashing_warning_fires_only_when_recomputation_dominates(model_dir: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    prompts, max_tokens = mixed_batch(seed=24, max_new=96)
    with caplog.at_level(logging.WARNING, logger="kvpage.engine"):
        roomy = LLM(model=str(model_dir), block_size=8, max_model_len=512)
        generate(roomy, prompts, max_tokens)
        assert not caplog.records and roomy.engine.thrashing.num_warnings == 0
        # Barely more than the longest request, no headroom, no prefix cache: requests evict each other.
        tight = LLM(model=str(model_dir), block_size=8, num_kv_blocks=(300 + 96) // 8 + 4, max_model_len=512,
                    headroom_policy="none", enable_prefix_caching=False)
        generate(tight, prompts, max_tokens)
    metrics = tight.get_metrics()
    assert tight.engine.thrashing.num_warnings >= 1
    assert any("thrashing" in r.message and "admission_cap" in r.message for r in caplog.records)
    assert metrics["num_recomputed_tokens"] > 0.1 * metrics["num_tokens_computed"]  # over the whole run


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_swap_and_auto_preemption_match_transformers(model_dir: Path, mode: str) -> None:
    prompts, max_tokens = mixed_batch(seed=25, max_new=64)
    llm = LLM(model=str(model_dir), block_size=8, num_kv_blocks=(300 + 64) // 8 + 8, max_model_len=512,
              headroom_policy="none", preemption_mode=mode, swap_space=0.05)
    engine = llm.engine
    decisions: list[bool] = []
    if mode == "auto":  # a cost model that answers swap, recompute, swap, ...: auto must follow it per victim
        class Alternating:
            def prefer_swap(self, num_tokens: int, num_pages: int) -> bool:
                decisions.append(len(decisions) % 2 == 0)
                return decisions[-1]

        engine.scheduler.swap_cost = Alternating()
    check(model_dir, llm, prompts, max_tokens)
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0 and metrics["num_swapped_out"] > 0
    assert metrics["num_swapped_in"] == metrics["num_swapped_out"]
    if mode == "swap":
        assert metrics["num_swapped_out"] == metrics["num_preemptions"] and metrics["num_recomputed_tokens"] == 0
    else:
        assert metrics["num_swapped_out"] == decisions.count(True) and decisions.count(False) >= 1
        assert metrics["num_recomputed_tokens"] > 0
    assert engine.kv.swap_space.num_free_pages == engine.kv.swap_space.num_pages
