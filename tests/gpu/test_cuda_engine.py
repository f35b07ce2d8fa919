"""The engine on a CUDA device (skipped where there is none).

float32 on CUDA must still be token-identical to transformers on CPU; the
demo model must produce the same greedy text on CUDA as on CPU. These run on
the lent H100/H200 machine (see docs/benchmarks.md for the last run), never in CI.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from kvpage import LLM, SamplingParams
from tests.checkpoints import hf_greedy, make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEMO_MODEL = Path(__file__).resolve().parents[2] / "kvpage" / "assets" / "demo-model"


def release(llm: LLM) -> None:
    del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama-tied"])
def test_float32_on_cuda_matches_transformers(tmp_path: Path, arch: str) -> None:
    model_dir = make_checkpoint(tmp_path / arch, arch, seed=11)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(10, 300))] for _ in range(16)]
    max_tokens = [rng.randint(1, 24) for _ in prompts]
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", kv_cache_memory=1 << 30)
    assert llm.engine.runner.kv_caches[0][0].is_cuda
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, m, out in zip(prompts, max_tokens, outputs):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, m)
    assert llm.get_metrics()["kv_blocks_used"] == 0
    release(llm)


@pytest.mark.skipif(not DEMO_MODEL.is_dir(), reason="no shipped demo model")
def test_demo_model_greedy_text_is_the_same_on_cuda_and_cpu() -> None:
    params = SamplingParams(temperature=0, max_tokens=32)
    on_cuda = LLM(model=str(DEMO_MODEL), device="cuda", dtype="float32", kv_cache_memory=1 << 28)
    cuda_text = on_cuda.generate("And God said", params, use_tqdm=False)[0].outputs[0].text
    release(on_cuda)
    cpu_text = LLM(model=str(DEMO_MODEL), device="cpu").generate("And God said", params,
                                                                  use_tqdm=False)[0].outputs[0].text
    assert cuda_text == cpu_text and len(cuda_text.split()) > 5
