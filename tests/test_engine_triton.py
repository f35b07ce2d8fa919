"""The engine on the Triton kernels equals transformers, token for token.

Off a GPU the kernels run in Triton's interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1``), so ``attention_backend="triton"`` drives the very
kernels a GPU compiles (cache write, decode with split-KV, prefill over a
cached prefix and chunks, page copy) through whole engine runs: prefix-cache
hits, chunked prefill, preemption, copy-on-write forks and a sliding window.
Shapes are small because the interpreter runs every program in Python.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("triton")

from kvpage import LLM, SamplingParams  # noqa: E402
from tests.checkpoints import hf_greedy, make_checkpoint  # noqa: E402

VOCAB = 256


def prompts_and_lengths(seed: int, num: int, shared: int = 0, longest_tail: int = 90
                        ) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(shared)]
    prompts = [prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, longest_tail))] for _ in range(num)]
    return prompts, [rng.randint(1, 10) for _ in range(num)]


def run_and_compare(model_dir: Path, prompts: list[list[int]], max_tokens: list[int], n: int = 1,
                    **options: object) -> LLM:
    llm = LLM(model=str(model_dir), attention_backend="triton", dtype="float32", seed=0, **options)
    assert llm.engine.runner.kv_cache.use_kernels
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, n=n) for m in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (prompt, m, out) in enumerate(zip(prompts, max_tokens, outputs)):
        expected = hf_greedy(model_dir, prompt, m)
        for sibling in out.outputs:
            assert sibling.token_ids == expected, f"prompt {i} (len {len(prompt)}, max_tokens {m}) diverged"
    metrics = llm.get_metrics()
    assert metrics["kv_blocks_used"] == 0
    return llm


def test_prefix_hits_and_forks_on_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvpage.ops import triton_cache

    copies: list[list[tuple[int, int]]] = []
    kernel_copy = triton_cache.copy_pages

    def counting_copy(caches: object, pairs: list[tuple[int, int]]) -> None:
        copies.append(pairs)
        kernel_copy(caches, pairs)

    monkeypatch.setattr(triton_cache, "copy_pages", counting_copy)
    model_dir = make_checkpoint(tmp_path / "qwen3", "qwen3", seed=11, vocab_size=VOCAB)
    # Short tails: the interpreter runs the fused qk-norm/RoPE/cache kernel once a token, at ~20 ms each.
    prompts, max_tokens = prompts_and_lengths(seed=1, num=8, shared=40, longest_tail=30)
    # Four sequences at a time: later prompts prefill only their tails over the cached shared
    # prefix; n=2 siblings share the prompt's last page until they write into it (copy-on-write).
    llm = run_and_compare(model_dir, prompts, max_tokens, n=2, block_size=16, max_num_seqs=4)
    assert llm.get_metrics()["prefix_cache_hits"] >= 32 * 5
    assert copies, "no copy-on-write went through the page-copy kernel"


def test_preemption_and_chunked_prefill_on_kernels(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", seed=12, vocab_size=VOCAB)
    prompts, max_tokens = prompts_and_lengths(seed=2, num=8)
    llm = run_and_compare(model_dir, prompts, max_tokens, block_size=4, num_kv_blocks=27,
                          max_num_batched_tokens=29, headroom_policy="none")
    assert llm.get_metrics()["num_preemptions"] > 0


def test_sliding_window_on_kernels(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "mistral", "mistral", seed=13, vocab_size=VOCAB, sliding_window=16)
    prompts, max_tokens = prompts_and_lengths(seed=3, num=6)
    run_and_compare(model_dir, prompts, max_tokens, block_size=8)


def test_seeded_sampling_on_the_one_pass_kernel_is_batch_independent(tmp_path: Path) -> None:
    """With the kernels, temperature rows draw by Gumbel-max; a seeded request's tokens ignore its batch."""
    model_dir = make_checkpoint(tmp_path / "llama", "llama", seed=14, vocab_size=VOCAB)
    llm = LLM(model=str(model_dir), attention_backend="triton", dtype="float32", seed=0)
    assert llm.engine.runner.sampler.use_kernels
    prompts, _ = prompts_and_lengths(seed=4, num=5, longest_tail=24)
    params = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=100 + i) for i in range(5)]
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    alone = llm.generate({"prompt_token_ids": prompts[3]}, params[3], use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == together[3].outputs[0].token_ids
    assert llm.engine.runner.sampler._num_kernel_draws > 0
    distinct = {tuple(out.outputs[0].token_ids) for out in together}
    assert len(distinct) == 5
    assert llm.get_metrics()["kv_blocks_used"] == 0
