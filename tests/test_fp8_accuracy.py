"""What FP8 KV costs in accuracy on the real model (SmolLM2-135M-Instruct), measured and bounded.

Three measures, each against 16-bit KV of the same model:

* the perplexity of held-out English (``PROSE`` and :data:`tests.held_out.ESSAYS`, about 1,100 tokens), from
  prompt logprobs: at most 1% higher with E4M3 (the issue's aim), with the float32 model whose K/V is
  rounded to bfloat16 as it is stored as the 16-bit baseline, so that only the KV format differs;
* the share of greedy chat tokens that agree before the first divergence;
* the error of the logits over the prose, relative to their norm.

The bf16 model is measured too, with a looser bound: its own rounding amplifies FP8's, by an amount that
depends on the CPU (the same 289-token measurement gave +1.6% on one machine and +2.3% on another, with E5M2
ahead of E4M3 there; docs/benchmarks.md, "FP8 KV cache").

A fixed scale of 1.0, what an uncalibrated cache without per-token scales does, must fail the bound where K
passes E4M3's range. SmolLM2's own keys stay under 25, so the test also runs an equivalent model whose keys
are 64 times larger (``k_proj`` times 64, ``q_proj`` over 64: every score is the same, and is in floating
point, since the factors are powers of two), as the keys of models with large K biases or outlier channels
are: there a fixed scale clips and fails, and kvpage's per-token scales give the same perplexity bit for bit.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvpage import LLM, SamplingParams
from kvpage.ops import attention as attention_ops
from kvpage.ops import fused
from tests.held_out import ESSAYS
from tests.paged_runner import PagedRunner
from tests.test_prompt_logprobs import PROSE
from tests.test_real_model import QUESTIONS, chat_prompt

TEXT = PROSE + "\n\n" + ESSAYS
PERPLEXITY_BOUND = 0.01  # the aim; measured +0.39% (float32 model, E4M3 against 16-bit KV)
BF16_PERPLEXITY_BOUND = 0.025  # measured +1.18% (bf16 model); see the module docstring
E5M2_BOUND = 0.05  # measured +3.28%
AGREEMENT_BOUND = 0.3  # measured 0.443 on 8 chats (0.375 on an earlier machine; bf16 weights against float32: 0.56)
LOGIT_ERROR_BOUND = 0.08  # measured 0.053
KEY_FACTOR = 64  # SmolLM2's largest |K|, 24.3, becomes 1555: past E4M3's 448


def perplexity(llm: LLM, text: str) -> float:
    out = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_logprobs is not None
    ids = out.prompt_token_ids
    chosen = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]  # type: ignore[index]
    return math.exp(-sum(chosen) / len(chosen))


def greedy_answers(llm: LLM, questions: list[str]) -> list[list[int]]:
    prompts = [chat_prompt(llm.get_tokenizer(), q) for q in questions]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """The share of reference tokens matched before each answer's first divergence."""
    agreed = 0
    for a, b in zip(ours, reference):
        agreed += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return agreed / sum(len(b) for b in reference)


def fixed_scale_quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale of 1.0 for everything (byte 127): values past the format's range clip."""
    limit = torch.finfo(dtype).max
    return x.float().clamp(-limit, limit).to(dtype), torch.full(x.shape[:-1], 127, dtype=torch.uint8,
                                                                device=x.device)


def store_16_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """K/V rounded to bfloat16 as the CPU path stores them: a float32 model with a 16-bit cache."""
    store = fused.write_kv_cache

    def rounded(key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        store(key.bfloat16().to(key.dtype), value.bfloat16().to(value.dtype), *args, **kwargs)

    monkeypatch.setattr(fused, "write_kv_cache", rounded)


def store_fixed_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_ops, "quantize", fixed_scale_quantize)


def with_large_keys(source: Path, target: Path) -> Path:
    """The same model with K ``KEY_FACTOR`` times larger and q as many times smaller: equal scores."""
    shutil.copytree(source, target)
    state = load_file(str(source / "model.safetensors"))
    for name, tensor in state.items():
        if name.endswith("k_proj.weight"):
            state[name] = tensor * KEY_FACTOR
        elif name.endswith("q_proj.weight"):
            state[name] = tensor / KEY_FACTOR
    save_file(state, str(target / "model.safetensors"))
    return target


def text_perplexity(model_dir: Path, dtype: str, kv_cache_dtype: str,
                    store: Callable[[pytest.MonkeyPatch], None] | None = None) -> float:
    llm = LLM(model=str(model_dir), dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    with pytest.MonkeyPatch.context() as patch:
        if store is not None:
            store(patch)
        result = perplexity(llm, TEXT)
    assert llm.engine.kv.num_pages_in_use == 0
    return result


@pytest.fixture(scope="module")
def measured(real_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Perplexities under each KV format (float32 model unless named bf16); greedy chats and logits."""
    model = real_model.hf_dir
    large_keys = with_large_keys(model, tmp_path_factory.mktemp("smollm2-large-keys") / "model")
    results: dict[str, Any] = {
        "16-bit": text_perplexity(model, "float32", "auto", store_16_bit),
        "e4m3": text_perplexity(model, "float32", "fp8"),
        "e5m2": text_perplexity(model, "float32", "fp8_e5m2"),
        "e4m3 scale 1.0": text_perplexity(model, "float32", "fp8", store_fixed_scale),
        "large keys e4m3": text_perplexity(large_keys, "float32", "fp8"),
        "large keys e4m3 scale 1.0": text_perplexity(large_keys, "float32", "fp8", store_fixed_scale),
        "bf16 model": text_perplexity(model, "bfloat16", "auto"),
        "bf16 model e4m3": text_perplexity(model, "bfloat16", "fp8"),
    }
    answers = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(model=str(model), dtype="float32", kv_cache_dtype=kv_cache_dtype)
        answers[kv_cache_dtype] = greedy_answers(llm, QUESTIONS[:8])
    results["agreement"] = agreement(answers["fp8"], answers["auto"])
    ids = real_model.tokenizer(PROSE).input_ids
    logits = {kv: PagedRunner(llm.engine.model, num_pages=128, kv_dtype=dtype).step({0: ids})[0]
              for kv, dtype in (("auto", None), ("fp8", torch.float8_e4m3fn))}
    results["logit error"] = ((logits["fp8"] - logits["auto"]).norm() / logits["auto"].norm()).item()
    print({k: round(v, 4) for k, v in results.items()})
    return results


def test_fp8_e4m3_perplexity_within_one_percent_of_16_bit_kv(measured: dict[str, Any]) -> None:
    assert measured["e4m3"] <= measured["16-bit"] * (1 + PERPLEXITY_BOUND)
    assert measured["bf16 model e4m3"] <= measured["bf16 model"] * (1 + BF16_PERPLEXITY_BOUND)


def test_fp8_e5m2_costs_more_than_e4m3(measured: dict[str, Any]) -> None:
    assert measured["e4m3"] < measured["e5m2"] <= measured["16-bit"] * (1 + E5M2_BOUND)


def test_a_fixed_scale_of_one_fails_the_bound_where_keys_pass_the_range(measured: dict[str, Any]) -> None:
    """Measured +18% with keys 64x larger; per-token power-of-two scales round those keys exactly as before."""
    assert measured["large keys e4m3 scale 1.0"] > measured["16-bit"] * (1 + PERPLEXITY_BOUND)
    assert measured["large keys e4m3"] == pytest.approx(measured["e4m3"], rel=1e-6)


def test_a_fixed_scale_of_one_rounds_like_per_token_scales_where_nothing_clips(measured: dict[str, Any]) -> None:
    """SmolLM2's own K/V stays far inside E4M3's range (|K| <= 25): a power of two only moves the exponent."""
    assert measured["e4m3 scale 1.0"] == pytest.approx(measured["e4m3"], rel=0.005)


def test_fp8_greedy_chats_and_logits_stay_close(measured: dict[str, Any]) -> None:
    assert measured["agreement"] >= AGREEMENT_BOUND
    assert measured["logit error"] <= LOGIT_ERROR_BOUND
