"""The engine on a CUDA device (skipped where there is none).

float32 on CUDA must still be token-identical to transformers on CPU; the
demo model must produce the same greedy text on CUDA as on CPU. These run on
the lent H100/H200 machine (see docs/benchmarks.md for the last run), never in CI.
"""

from __future__ import annotations

import gc
import json
import os
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


EXECUTION = {  # name: engine options
    "kernels+graphs": {},
    "kernels-eager": {"enforce_eager": True},
    "torch-reference": {"attention_backend": "torch"},
    "sdpa": {"attention_backend": "sdpa"},  # the CPU fast path, which runs on CUDA as well
}


def random_prompts(seed: int, num: int = 16) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(10, 300))] for _ in range(num)]
    return prompts, [rng.randint(1, 24) for _ in prompts]


@pytest.mark.parametrize("execution", EXECUTION)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama-tied", "mistral"])
def test_float32_on_cuda_matches_transformers(tmp_path: Path, arch: str, execution: str) -> None:
    """IEEE float32 products in the kernels: token-identical to transformers, with and without graphs."""
    overrides = {"sliding_window": 64} if arch == "mistral" else {}
    model_dir = make_checkpoint(tmp_path / arch, arch, seed=11, **overrides)
    prompts, max_tokens = random_prompts(1)
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", kv_cache_memory=1 << 30,
              **EXECUTION[execution])
    assert llm.engine.runner.kv_caches[0][0].is_cuda
    assert (llm.engine.runner.graphs is not None) == (execution == "kernels+graphs")
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


def test_bfloat16_logit_error_and_first_divergence(tmp_path: Path) -> None:
    """bf16 (the GPU default) against float32 transformers: how far the logits move, where greedy text forks.

    Random-weight models have nearly flat next-token distributions, so bf16 greedy text may fork at
    the first token; what must hold is that it forks only where float32 itself nearly ties: at the
    first divergence, the float32 logit of bf16's token is within a few bf16 logit errors of the top.
    Writes the figures to ``$KVPAGE_REPORT_DIR/bf16_accuracy.json`` when that is set (the device pass does).
    """
    from kvpage.model import load_model
    from kvpage.ops import AttentionMetadata
    from tests.checkpoints import hf_logits

    report: dict[str, object] = {}
    for arch in ("llama", "qwen3"):
        model_dir = make_checkpoint(tmp_path / arch, arch, seed=11)
        prompts, _ = random_prompts(2, num=8)
        model = load_model(model_dir, torch.bfloat16, torch.device("cuda"))
        config = model.config
        errors, abs_errors = [], []
        for prompt in prompts:
            pages = -(-len(prompt) // 16)
            cache = torch.zeros(2 * config.num_layers, pages, 16, config.num_kv_heads, config.head_dim,
                                dtype=torch.bfloat16, device="cuda")
            layers = [(cache[2 * i], cache[2 * i + 1]) for i in range(config.num_layers)]
            meta = AttentionMetadata.build([len(prompt)], [len(prompt)], [list(range(pages))], 16, device="cuda")
            hidden = model(torch.tensor(prompt, device="cuda"), meta.positions(), layers, meta)
            logits = model.compute_logits(hidden).cpu()
            expected = hf_logits(model_dir, prompt)
            errors.append(((logits - expected).norm() / expected.norm()).item())
            abs_errors.append((logits - expected).abs().max().item())
        del model
        llm = LLM(model=str(model_dir), device="cuda", kv_cache_memory=1 << 30)
        assert llm.engine.dtype == torch.bfloat16
        max_new = 48
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True), use_tqdm=False)
        first_divergence, margins = [], []
        for prompt, out in zip(prompts, outputs):
            expected_ids = hf_greedy(model_dir, prompt, max_new)
            ids = out.outputs[0].token_ids
            fork = next((i for i, (a, b) in enumerate(zip(ids, expected_ids)) if a != b), None)
            first_divergence.append(fork)
            if fork is not None:  # float32's preference for its own token over bf16's, where they fork
                reference = hf_logits(model_dir, prompt + expected_ids[:fork])[-1]
                margins.append((reference[expected_ids[fork]] - reference[ids[fork]]).item())
        release(llm)
        report[arch] = {"logit_relative_error_max": max(errors), "logit_relative_error_mean": sum(errors) / len(errors),
                        "logit_abs_error_max": max(abs_errors), "first_divergence_of_48": first_divergence,
                        "float32_margin_at_divergence": margins}
        print(arch, report[arch])
        # bf16 keeps ~3 significant digits: logits move by about a percent, not more.
        assert max(errors) < 0.05
        # Forks happen only at near-ties of the float32 model.
        assert all(0 <= m <= 4 * max(abs_errors) for m in margins), margins
    directory = os.environ.get("KVPAGE_REPORT_DIR")
    if directory:
        Path(directory, "bf16_accuracy.json").write_text(json.dumps(report, indent=1))


def test_gpu_memory_utilization_bounds_the_peak(tmp_path: Path) -> None:
    """The KV cache is sized after a profiling run, so a worst-case workload stays under the fraction asked for."""
    # 16 KiB of bf16 K/V a token: 256 sequences of 1024 tokens could fill 4 GiB, more than the fraction
    # allows, so the profiled budget (not the batch's own ceiling) sizes the cache.
    model_dir = make_checkpoint(tmp_path / "llama", "llama", seed=11, hidden_size=1024, num_layers=4, num_heads=8,
                                num_kv_heads=8)
    gc.collect()  # earlier tests' engines (reference cycles) hold their KV caches until collected
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _, total = torch.cuda.mem_get_info()
    baseline = torch.cuda.memory_allocated()
    fraction = 0.02
    llm = LLM(model=str(model_dir), device="cuda", gpu_memory_utilization=fraction, max_num_batched_tokens=4096,
              max_num_seqs=256, max_model_len=1024)
    kv_bytes = llm.get_metrics()["kv_cache_bytes"]
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(500, 1000))] for _ in range(64)]
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True), use_tqdm=False)
    peak = torch.cuda.max_memory_reserved() - baseline
    print(f"kv cache {kv_bytes / 2**30:.2f} GiB, peak reserved {peak / 2**30:.2f} GiB of "
          f"{fraction * total / 2**30:.2f} GiB allowed")
    # Most of the allowance goes to the KV cache, and the peak stays within it.
    assert kv_bytes > 0.5 * fraction * total
    assert peak <= fraction * total
    release(llm)


def test_dashboard_frames_on_the_asynchronous_cuda_engine() -> None:
    """Frames taken between steps with a step in flight agree with the KV manager, as on the CPU."""
    from tests.test_dashboard import check_paged_frame

    llm = LLM(device="cuda", num_kv_blocks=16, block_size=16, max_model_len=256)
    engine = llm.engine
    assert engine.async_scheduling
    prefix = "The quick brown fox jumps over the lazy dog. " * 4
    for i in range(6):
        engine.add_request(f"r{i}", prefix + f"Story {i}:", SamplingParams(max_tokens=60, ignore_eos=True, n=1 + i % 2,
                                                                           temperature=0.8, seed=i))
    shared = preempted = False
    while engine.has_unfinished_requests():
        engine.step()
        frame = engine.frame().to_json()
        check_paged_frame(frame)
        shared |= "s" in frame["pages"]
        preempted |= bool(frame["events"]["preemptions"])
    assert shared and preempted
    assert engine.kv.num_pages_in_use == 0
    release(llm)


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs a machine of one GPU")
def test_more_ranks_than_gpus_are_refused_before_any_process_starts() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs from cuda, but 1 are present"):
        LLM(device="cuda", tensor_parallel_size=2)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_pages_under_cuda_graphs_and_async_scheduling_equal_eager_and_roomy_runs(
        tmp_path: Path, kv_cache_dtype: str) -> None:
    """8-bit pages through the compiled kernels: the decode graphs (captured with the scale reads inside) and
    asynchronous scheduling under preemption give the outputs of an eager run with room to spare, and the
    store kernels write the bytes the torch specification writes."""
    model_dir = make_checkpoint(tmp_path / "llama", "llama", seed=11)
    prompts, max_tokens = random_prompts(2)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    runs = {"eager, roomy": {"enforce_eager": True, "kv_cache_memory": 1 << 28},
            "graphs+async, tight": {"num_kv_blocks": (300 + 24) // 16 + 4, "headroom_policy": "none"},
            "graphs+async, swap": {"num_kv_blocks": (300 + 24) // 16 + 4, "headroom_policy": "none",
                                   "preemption_mode": "swap", "swap_space": 0.05}}
    outputs = {}
    for name, options in runs.items():
        llm = LLM(model=str(model_dir), device="cuda", dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, **options)
        assert llm.engine.cache_shape.scaled and (llm.engine.runner.graphs is not None) == ("graphs" in name)
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outputs[name] = [r.outputs[0].token_ids for r in results]
        metrics = llm.get_metrics()
        assert metrics["kv_blocks_used"] == 0
        if "tight" in name or "swap" in name:
            assert metrics["num_preemptions"] > 0
        release(llm)
    assert outputs["graphs+async, tight"] == outputs["eager, roomy"]
    assert outputs["graphs+async, swap"] == outputs["eager, roomy"]
