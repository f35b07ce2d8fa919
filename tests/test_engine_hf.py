"""Greedy kvpage output equals transformers' own generate, token for token.

Every case runs a batch of 16 prompts of mixed lengths (10 to 300 tokens) and
mixed ``max_tokens`` together through continuous batching, and compares each
output with ``transformers.generate`` on the same random checkpoint (float32,
CPU). The variations are the ones paging must not change: page size, prefix
cache hits, preemption under a tiny cache, chunked prefill, and forked
siblings (``n > 1``) sharing pages copy-on-write.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

import pytest

from kvpage import LLM, SamplingParams
from tests.checkpoints import ARCHITECTURES, hf_greedy, make_checkpoint

VOCAB = 512
NUM_PROMPTS = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_checkpoint(root / arch, arch, seed=11, vocab_size=VOCAB) for arch in ARCHITECTURES}


def mixed_batch(seed: int, shared_prefix: list[int] | None = None,
                max_new: int = 24) -> tuple[list[list[int]], list[int]]:
    """16 prompts of 10-300 tokens (one of each extreme) and their max_tokens (1 to max_new)."""
    rng = random.Random(seed)
    lengths = [10, 300] + [rng.randint(10, 300) for _ in range(NUM_PROMPTS - 2)]
    prompts = []
    for length in lengths:
        prompt = [rng.randrange(3, VOCAB) for _ in range(length)]
        if shared_prefix is not None:
            prompt = (shared_prefix + prompt)[: max(length, len(shared_prefix) + 5)]
        prompts.append(prompt)
    max_tokens = [1, max_new] + [rng.randint(1, max_new) for _ in range(NUM_PROMPTS - 2)]
    return prompts, max_tokens


@cache
def reference(model_dir: Path, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    return hf_greedy(model_dir, list(prompt), max_tokens)


def run_and_compare(model_dir: Path, prompts: list[list[int]], max_tokens: list[int], **options: object) -> LLM:
    llm = LLM(model=str(model_dir), seed=0, **options)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (prompt, m, out) in enumerate(zip(prompts, max_tokens, outputs)):
        expected = reference(model_dir, tuple(prompt), m)
        assert out.outputs[0].token_ids == expected, f"prompt {i} (len {len(prompt)}, max_tokens {m}) diverged"
        assert out.outputs[0].finish_reason == "length"
    assert_all_pages_back(llm)
    return llm


def assert_all_pages_back(llm: LLM) -> None:
    metrics = llm.get_metrics()
    assert metrics["kv_blocks_used"] == 0
    assert metrics["kv_blocks_free"] + metrics["kv_blocks_cached"] == metrics["kv_blocks_total"]
    assert all(p.ref_count == 0 for p in llm.engine.kv.pool.pages)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_matches_transformers(checkpoints: dict[str, Path], arch: str) -> None:
    prompts, max_tokens = mixed_batch(seed=1)
    run_and_compare(checkpoints[arch], prompts, max_tokens)


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_page_size_does_not_change_outputs(checkpoints: dict[str, Path], block_size: int) -> None:
    prompts, max_tokens = mixed_batch(seed=2)
    run_and_compare(checkpoints["llama"], prompts, max_tokens, block_size=block_size)


def test_prefix_cache_hits_do_not_change_outputs(checkpoints: dict[str, Path]) -> None:
    rng = random.Random(3)
    shared = [rng.randrange(3, VOCAB) for _ in range(70)]
    prompts, max_tokens = mixed_batch(seed=3, shared_prefix=shared)
    # Four at a time, so later prompts are admitted after earlier ones have cached the prefix.
    llm = run_and_compare(checkpoints["qwen3"], prompts, max_tokens, block_size=16, max_num_seqs=4)
    first = llm.get_metrics()
    assert first["prefix_cache_hits"] >= 64 * (NUM_PROMPTS - 4)
    # A second wave finds everything from the first in the cache.
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                           use_tqdm=False)
    for prompt, m, out in zip(prompts, max_tokens, outputs):
        assert out.outputs[0].token_ids == reference(checkpoints["qwen3"], tuple(prompt), m)
        assert out.num_cached_tokens >= (len(prompt) - 1) // 16 * 16 - 16
    second = llm.get_metrics()
    assert second["prefix_cache_hits"] - first["prefix_cache_hits"] > sum(len(p) for p in prompts) // 2
    assert_all_pages_back(llm)


@pytest.mark.parametrize("block_size", [4, 16])
def test_preemption_does_not_change_outputs(checkpoints: dict[str, Path], block_size: int) -> None:
    prompts, max_tokens = mixed_batch(seed=4, max_new=64)
    # Room for the longest request and a little more: running requests outgrow the cache.
    num_blocks = (300 + 64) // block_size + 8
    llm = run_and_compare(checkpoints["llama"], prompts, max_tokens, block_size=block_size,
                          num_kv_blocks=num_blocks)
    assert llm.get_metrics()["num_preemptions"] > 0
    assert llm.get_metrics()["num_recomputed_tokens"] > 0


def test_preemption_without_prefix_cache(checkpoints: dict[str, Path]) -> None:
    prompts, max_tokens = mixed_batch(seed=5, max_new=64)
    llm = run_and_compare(checkpoints["mistral"], prompts, max_tokens, block_size=8, num_kv_blocks=50,
                          enable_prefix_caching=False)
    assert llm.get_metrics()["num_preemptions"] > 0
    assert llm.get_metrics()["prefix_cache_hits"] == 0


def test_chunked_prefill_does_not_change_outputs(checkpoints: dict[str, Path]) -> None:
    prompts, max_tokens = mixed_batch(seed=6)
    llm = run_and_compare(checkpoints["qwen2"], prompts, max_tokens, max_num_batched_tokens=37, max_num_seqs=5)
    assert llm.get_metrics()["step_num_steps"] > sum(len(p) for p in prompts) // 37


def test_forked_greedy_siblings_all_match(checkpoints: dict[str, Path]) -> None:
    """n=3 greedy siblings share the prompt's pages; each must still equal the reference."""
    prompts, max_tokens = mixed_batch(seed=7)
    prompts, max_tokens = prompts[:6], max_tokens[:6]
    model_dir = checkpoints["llama-tied"]
    llm = LLM(model=str(model_dir), seed=0, block_size=16)
    params = [SamplingParams(n=3, temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, m, out in zip(prompts, max_tokens, outputs):
        expected = reference(model_dir, tuple(prompt), m)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == expected for c in out.outputs)
    assert_all_pages_back(llm)


def test_stops_at_eos_like_transformers(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "probe", "llama", seed=11, vocab_size=VOCAB)
    prompt = [random.Random(8).randrange(3, VOCAB) for _ in range(40)]
    free_run = hf_greedy(base, prompt, 12)
    eos = free_run[5]  # a token the model is known to produce at step 6 (or earlier)
    model_dir = make_checkpoint(tmp_path / "eos", "llama", seed=11, vocab_size=VOCAB, eos_token_id=eos)
    expected = hf_greedy(model_dir, prompt, 12, ignore_eos=False)
    assert expected[-1] == eos and len(expected) <= 6
    llm = LLM(model=str(model_dir))
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected and out.finish_reason == "stop"
    ignored = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert ignored[0].outputs[0].token_ids == free_run


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_mostly_agrees(checkpoints: dict[str, Path], dtype: str) -> None:
    """Half precision cannot be token-identical, but its first tokens should mostly agree with float32."""
    prompts, max_tokens = mixed_batch(seed=9)
    model_dir = checkpoints["llama"]
    llm = LLM(model=str(model_dir), dtype=dtype, block_size=16)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(__import__("torch"), dtype)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    agree = sum(out.outputs[0].token_ids[0] == reference(model_dir, tuple(p), m)[0]
                for p, m, out in zip(prompts, max_tokens, outputs))
    assert all(len(out.outputs[0].token_ids) == m for out, m in zip(outputs, max_tokens))
    assert agree >= 12, f"only {agree}/16 first tokens agree with float32"
    assert_all_pages_back(llm)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_both_cpu_attention_paths_match_transformers(checkpoints: dict[str, Path], backend: str) -> None:
    """The reference (the spec) and the SDPA path ("auto" on a CPU), named explicitly, over chunks and prefix hits."""
    rng = random.Random(10)
    prompts, max_tokens = mixed_batch(seed=10, shared_prefix=[rng.randrange(3, VOCAB) for _ in range(40)])
    llm = run_and_compare(checkpoints["qwen3"], prompts, max_tokens, block_size=16, max_num_seqs=6,
                          max_num_batched_tokens=96, attention_backend=backend)
    assert llm.engine.runner.options.attention_backend == backend
    assert llm.get_metrics()["prefix_cache_hits"] > 0
