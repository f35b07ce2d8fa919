"""The engine over 8-bit KV pages: every path completes, frees every page, and pressure does not change outputs.

A token's scale depends only on its own K/V (kvpage.kv.format), so a page's
bytes are the same whether it was computed alone, in a batch, in chunks,
recomputed after a preemption, swapped out and back, copied on write or
found in the prefix cache. Greedy outputs of an FP8 run must therefore not
depend on memory pressure, the layout or the schedule, as for 16-bit pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvpage import LLM, SamplingParams
from kvpage.kv.format import kv_format
from tests.checkpoints import make_checkpoint
from tests.test_engine_hf import VOCAB, assert_all_pages_back, mixed_batch

MAX_NEW = 40
# On the CPU even where a GPU is present: these are the CI's checks (tests/gpu has the CUDA ones).
ROOMY = {"block_size": 8, "max_model_len": 512, "device": "cpu"}
# Barely more than the longest request, no headroom: sequences preempt each other.
TIGHT = {**ROOMY, "num_kv_blocks": (300 + MAX_NEW) // 8 + 8, "headroom_policy": "none"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("fp8") / "llama", "llama", seed=11, vocab_size=VOCAB)


def run(model_dir: Path, params: list[SamplingParams], prompts: list[list[int]],
        **options: Any) -> tuple[list[list[list[int]]], dict[str, Any]]:
    llm = LLM(model=str(model_dir), kv_cache_dtype="fp8", **options)
    assert llm.engine.cache_shape.scaled
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if options.get("kv_layout", "paged") == "paged":
        assert_all_pages_back(llm)
    assert llm.engine.kv.num_pages_in_use == 0
    return [[c.token_ids for c in out.outputs] for out in outputs], llm.get_metrics()


def greedy(max_tokens: list[int]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]


@pytest.fixture(scope="module")
def batch() -> tuple[list[list[int]], list[int]]:
    return mixed_batch(seed=31, max_new=MAX_NEW)


@pytest.fixture(scope="module")
def roomy(model_dir: Path, batch: tuple[list[list[int]], list[int]]) -> list[list[list[int]]]:
    prompts, max_tokens = batch
    outputs, metrics = run(model_dir, greedy(max_tokens), prompts, **ROOMY)
    assert metrics["num_preemptions"] == 0
    return outputs


@pytest.mark.parametrize("name,options,pressure", [
    ("recompute", TIGHT, "num_recomputed_tokens"),
    ("swap", {**TIGHT, "preemption_mode": "swap", "swap_space": 0.05}, "num_swapped_out"),
    ("async recompute", {**TIGHT, "async_scheduling": True}, "num_recomputed_tokens"),
    ("chunked prefill", {**ROOMY, "max_num_batched_tokens": 48}, None),
    ("contiguous-request", {**ROOMY, "kv_layout": "contiguous-request", "num_kv_blocks": 100}, None),
    ("contiguous-max", {**ROOMY, "kv_layout": "contiguous-max", "num_kv_blocks": 200}, None),
    ("reference attention", {**ROOMY, "attention_backend": "torch"}, None),
])
def test_fp8_outputs_do_not_depend_on_pressure_layout_or_schedule(
        model_dir: Path, batch: tuple[list[list[int]], list[int]], roomy: list[list[list[int]]], name: str,
        options: dict[str, Any], pressure: str | None) -> None:
    prompts, max_tokens = batch
    outputs, metrics = run(model_dir, greedy(max_tokens), prompts, **options)
    for i, (ours, expected) in enumerate(zip(outputs, roomy)):
        assert ours == expected, f"{name}: prompt {i} diverged"
    if pressure is not None:
        assert metrics["num_preemptions"] > 0 and metrics[pressure] > 0


def test_fp8_prefix_cache_hits_give_the_outputs_of_a_cold_cache(model_dir: Path) -> None:
    shared = list(range(40, 40 + 96))
    prompts, max_tokens = mixed_batch(seed=32, shared_prefix=shared, max_new=16)
    cold, _ = run(model_dir, greedy(max_tokens), prompts, **ROOMY, enable_prefix_caching=False)
    llm = LLM(model=str(model_dir), kv_cache_dtype="fp8", **ROOMY)
    for _ in range(2):  # the second pass finds every prompt's full pages cached by the first
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens), use_tqdm=False)
        assert [[c.token_ids for c in out.outputs] for out in outputs] == cold
    assert llm.get_metrics()["prefix_cache_hits"] >= sum(len(p) // 8 * 8 for p in prompts) - 8 * len(prompts)
    assert_all_pages_back(llm)


def test_fp8_beam_search_and_parallel_samples_share_pages_and_are_unchanged_by_pressure(model_dir: Path) -> None:
    prompts, _ = mixed_batch(seed=33)
    prompts = [p[:120] for p in prompts[:4]]
    params = [SamplingParams(n=3, use_beam_search=True, beam_width=3, temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(n=3, temperature=0.0, max_tokens=24, ignore_eos=True)] * 2
    roomy, metrics = run(model_dir, params, prompts, **ROOMY)
    assert metrics["kv_sharing_saving_mean"] > 0  # siblings shared prompt pages (copy-on-write at the fork)
    tight, metrics = run(model_dir, params, prompts, **{**TIGHT, "num_kv_blocks": 40})
    assert metrics["num_preemptions"] > 0
    assert tight == roomy


def test_fp8_sizing_holds_about_twice_the_pages_and_the_metrics_say_so(tmp_path: Path) -> None:
    # head_dim 64, bfloat16: 128 bytes a head vector against 64 + 1 scale byte.
    model = make_checkpoint(tmp_path / "wide", "llama", seed=3, vocab_size=VOCAB, hidden_size=128, num_heads=2,
                            num_kv_heads=2)
    memory = 1 << 20
    metrics = {}
    for dtype in ("auto", "fp8", "fp8_e5m2"):
        llm = LLM(model=str(model), dtype="bfloat16", kv_cache_memory=memory, kv_cache_dtype=dtype, block_size=16,
                  device="cpu")
        token_bytes = kv_format(dtype, 2).token_bytes(2, 2, 64)
        metrics[dtype] = llm.get_metrics()
        assert metrics[dtype]["kv_bytes_per_token"] == token_bytes
        assert metrics[dtype]["kv_blocks_total"] == memory // (16 * token_bytes)
        assert metrics[dtype]["kv_cache_bytes"] == metrics[dtype]["kv_blocks_total"] * 16 * token_bytes <= memory
        assert llm.engine.kv_cache_dtype == {"auto": "bfloat16", "fp8": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}[dtype]
    assert metrics["fp8"]["kv_blocks_total"] >= 1.9 * metrics["auto"]["kv_blocks_total"]
    assert metrics["fp8_e5m2"]["kv_blocks_total"] == metrics["fp8"]["kv_blocks_total"]


def test_a_bad_kv_cache_dtype_is_refused_naming_it(model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8', 'fp8_e4m3', "
                                         r"'fp8_e5m2'\), got 'int8'"):
        LLM(model=str(model_dir), kv_cache_dtype="int8")
