"""Tensor parallelism on CPUs: real gloo process groups, no mocks of torch.distributed.

* every sharded layer at tp = 2 and 4 equals its dense counterpart, and the
  shards really are split (or, past the KV head count, replicated);
* the ranks agree on the page count when their memory differs;
* a tp = 2 engine's greedy output equals tp = 1's and transformers' for the
  random checkpoints of every architecture, with prefix hits, under
  preemption (recompute and swap), with asynchronous scheduling, in beam
  search; seeded samples equal tp = 1's; tp = 4 replicates KV heads;
* bad values are refused before any process starts; a follower that dies
  or hangs fails the engine's step with a clear error, in bounded time;
* under torchrun the unchanged command joins torchrun's group.

The vocabulary (501) divides by neither 2 nor 4, so the vocabulary-parallel
embedding and LM head run with padding rows.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import torch

from kvpage import LLM, SamplingParams
from kvpage.ops.collectives import TPGroup
from kvpage.parallel import RankFailure
from tests.checkpoints import ARCHITECTURES, hf_greedy, make_checkpoint
from tests.tp_ranks import agreed_pages, layer_outputs, run_ranks

VOCAB = 501
HEAD_DIM = 16  # hidden 64 over 4 heads


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-ckpt")
    return {arch: make_checkpoint(root / arch, arch, seed=11, vocab_size=VOCAB) for arch in ARCHITECTURES}


def batch(seed: int, count: int = 8, prefix: int = 0) -> list[list[int]]:
    """Prompts of 5-120 tokens; with ``prefix``, all start with the same ``prefix`` tokens."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB) for _ in range(prefix)]
    return [shared + [rng.randrange(3, VOCAB) for _ in range(rng.randint(5, 120))] for _ in range(count)]


@cache
def reference(model_dir: Path, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    return hf_greedy(model_dir, list(prompt), max_tokens)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[list[int]]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in out.outputs] for out in outputs]


def assert_pages_back(llm: LLM) -> None:
    metrics = llm.get_metrics()
    assert metrics["kv_blocks_used"] == 0
    assert metrics["kv_blocks_free"] + metrics["kv_blocks_cached"] == metrics["kv_blocks_total"]


def tp_engine(model_dir: Path, size: int = 2, **options: object) -> LLM:
    llm = LLM(str(model_dir), device="cpu", seed=0, tensor_parallel_size=size, **options)
    assert llm.get_metrics()["tensor_parallel_size"] == size
    return llm


@pytest.mark.parametrize("size", [2, 4])
def test_each_parallel_layer_equals_its_dense_counterpart(checkpoints: dict[str, Path], tmp_path: Path,
                                                          size: int) -> None:
    model_dir = checkpoints["qwen2"]  # biases on q/k/v: column-parallel biases are sliced too
    prompts = batch(3, count=3)
    dense = layer_outputs(TPGroup.single(), model_dir, prompts)
    ranks = run_ranks(size, layer_outputs, tmp_path, model_dir, prompts)
    kv_local = max(2 // size, 1)
    for rank, got in enumerate(ranks):
        shard = got["shard"]
        assert (shard.num_heads, shard.num_kv_heads) == (4 // size, kv_local)
        # Past the KV head count, neighbouring ranks share (replicate) one KV head.
        assert shard.kv_head_start == (rank * kv_local if size <= 2 else rank // (size // 2))
        assert got["qkv_rows"] == (4 // size + 2 * kv_local) * HEAD_DIM
        for name in ("embed", "mlp", "o_proj", "logits_of_hidden"):
            torch.testing.assert_close(got[name], dense[name], rtol=1e-5, atol=1e-5, msg=f"{name}, rank {rank}")
        for step, (mine, whole) in enumerate(zip(got["paged_logits"], dense["paged_logits"])):
            for seq in whole:
                torch.testing.assert_close(mine[seq], whole[seq], rtol=1e-5, atol=1e-4,
                                           msg=f"paged logits, step {step}, sequence {seq}, rank {rank}")


def test_the_ranks_agree_on_the_page_count_when_their_memory_differs(checkpoints: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    per_page = 2 * 2 * 16 * 1 * HEAD_DIM * 4  # K and V, 2 layers, 16 slots, 1 KV head a rank, float32
    budgets = [90 * per_page, 40 * per_page]  # rank 1 can hold 40 pages only
    assert run_ranks(2, agreed_pages, tmp_path, checkpoints["llama"], budgets) == [40, 40]
    assert run_ranks(2, agreed_pages, tmp_path, checkpoints["llama"], budgets[::-1]) == [40, 40]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tp2_greedy_equals_tp1_and_transformers(checkpoints: dict[str, Path], arch: str) -> None:
    model_dir = checkpoints[arch]
    prompts = batch(1, prefix=40)  # a shared prefix: the second wave hits the prefix cache
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [[reference(model_dir, tuple(p), 12)] for p in prompts]
    llm = tp_engine(model_dir)
    try:
        assert generate(llm, prompts[:2], params) == expected[:2]
        assert generate(llm, prompts[2:], params) == expected[2:]
        assert llm.get_metrics()["prefix_cache_hits"] > 0
        assert_pages_back(llm)
    finally:
        llm.shutdown()
    one = LLM(str(model_dir), device="cpu", seed=0)
    assert generate(one, prompts, params) == expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tp2_greedy_is_unchanged_by_preemption(checkpoints: dict[str, Path], mode: str) -> None:
    model_dir = checkpoints["llama"]
    prompts = batch(2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = tp_engine(model_dir, num_kv_blocks=24, block_size=8, preemption_mode=mode, swap_space=0.01)
    try:
        got = generate(llm, prompts, params)
        metrics = llm.get_metrics()
        assert metrics["num_preemptions"] > 0
        assert (metrics["num_swapped_out"] > 0) == (mode == "swap")
        assert_pages_back(llm)
    finally:
        llm.shutdown()
    assert got == [[reference(model_dir, tuple(p), 24)] for p in prompts]


def test_tp2_asynchronous_scheduling_reads_in_flight_tokens_from_the_driver(checkpoints: dict[str, Path]) -> None:
    model_dir = checkpoints["qwen3"]
    prompts = batch(4)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = tp_engine(model_dir, async_scheduling=True)
    try:
        assert llm.engine.async_scheduling
        got = generate(llm, prompts, params)
        assert_pages_back(llm)
    finally:
        llm.shutdown()
    assert got == [[reference(model_dir, tuple(p), 16)] for p in prompts]


def test_tp2_seeded_samples_and_beams_equal_tp1(checkpoints: dict[str, Path]) -> None:
    model_dir = checkpoints["mistral"]
    prompts = batch(5, count=4)
    sampled = SamplingParams(n=3, temperature=0.9, top_p=0.9, seed=7, max_tokens=10, logprobs=2)
    beams = SamplingParams(n=2, use_beam_search=True, beam_width=3, temperature=0.0, max_tokens=8, ignore_eos=True)
    one = LLM(str(model_dir), device="cpu", seed=0)
    expected = generate(one, prompts, sampled), generate(one, prompts, beams)
    llm = tp_engine(model_dir)
    try:
        assert (generate(llm, prompts, sampled), generate(llm, prompts, beams)) == expected
        assert_pages_back(llm)
    finally:
        llm.shutdown()


def test_tp4_replicates_kv_heads_and_still_matches(checkpoints: dict[str, Path]) -> None:
    model_dir = checkpoints["llama"]  # 2 KV heads over 4 ranks
    prompts = batch(6, count=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = tp_engine(model_dir, size=4)
    try:
        assert llm.engine.cache_shape.num_kv_heads == 1
        assert generate(llm, prompts, params) == [[reference(model_dir, tuple(p), 8)] for p in prompts]
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("options", "message"), [
    ({"tensor_parallel_size": 3}, "tensor_parallel_size=3 must divide the model's num_attention_heads=4"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"tensor_parallel_size": 2, "distributed_backend": "nccl"}, "distributed_backend='nccl' needs CUDA"),
    ({"tensor_parallel_size": 2, "distributed_backend": "mpi"}, "distributed_backend"),
    ({"tensor_parallel_size": 2, "distributed_timeout": 0}, "distributed_timeout"),
])
def test_bad_parallel_values_are_refused_before_any_process_starts(checkpoints: dict[str, Path],
                                                                  options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LLM(str(checkpoints["llama"]), device="cpu", **options)
    assert not torch.distributed.is_initialized()


def test_a_killed_follower_fails_the_step_with_an_error(checkpoints: dict[str, Path]) -> None:
    llm = tp_engine(checkpoints["llama"])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    try:
        generate(llm, batch(7, count=2), params)
        follower = llm.engine.ranks.processes[0]
        follower.kill()
        follower.wait(10)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1"):
            generate(llm, batch(8, count=2), params)
        assert time.monotonic() - start < 10
        with pytest.raises(RankFailure):  # the engine stays failed
            generate(llm, batch(8, count=1), params)
    finally:
        llm.shutdown()
    assert not torch.distributed.is_initialized()


def test_a_hung_follower_times_out_instead_of_hanging(checkpoints: dict[str, Path]) -> None:
    llm = tp_engine(checkpoints["llama"], distributed_timeout=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    follower = llm.engine.ranks.processes[0]
    try:
        generate(llm, batch(7, count=2), params)
        os.kill(follower.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="tensor-parallel step failed"):
            generate(llm, batch(8, count=2), params)
        assert time.monotonic() - start < 30
    finally:
        os.kill(follower.pid, signal.SIGKILL)
        llm.shutdown()
    assert follower.poll() is not None


def test_under_torchrun_the_same_command_joins_its_group_and_prints_what_one_rank_prints() -> None:
    command = ["-m", "kvpage.cli", "generate", "--device", "cpu", "--max-tokens", "8", "--max-model-len", "128",
               "--json", "And God said"]
    one = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, check=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), *command, "-tp", "2"], capture_output=True, text=True, timeout=240)
    # A known defect, open (docs/architecture.md): about one run in twenty on this machine, rank 0 aborts in C++
    # teardown after the interpreter has finished ("terminate called without an active exception"), its work
    # and its output done. Anything else is a failure.
    aborted_after_exit = "terminate called without an active exception" in two.stderr
    assert two.returncode == 0 or aborted_after_exit, two.stderr
    # Rank 1 followed rank 0 and printed nothing; rank 0 printed the one-rank answer.
    assert two.stdout == one.stdout and json.loads(one.stdout)["outputs"][0]["token_ids"]


def test_followers_exit_when_the_driver_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text("import os, signal\nfrom kvpage import LLM\n"
                      "llm = LLM(device='cpu', tensor_parallel_size=2, max_model_len=128)\n"
                      "print(llm.engine.ranks.processes[0].pid, flush=True)\n"
                      "os.kill(os.getpid(), signal.SIGKILL)\n")
    driver = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert driver.returncode == -signal.SIGKILL
    follower = int(driver.stdout.split()[0])
    deadline = time.monotonic() + 30
    while running(follower) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(follower), "a follower outlived its driver"


def running(pid: int) -> bool:
    """Alive and not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_tp2_runs_the_triton_kernels_on_each_shard(checkpoints: dict[str, Path]) -> None:
    pytest.importorskip("triton")
    # TRITON_INTERPRET=1 (tests/conftest.py) reaches the followers through their environment.
    model_dir = checkpoints["qwen3"]  # q/k norms: the fused norm + RoPE + cache-store kernel on 2 of 4 heads
    prompts = batch(9, count=3, prefix=20)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = tp_engine(model_dir, attention_backend="triton", dtype="float32", block_size=8)
    try:
        assert llm.engine.runner.kv_cache.use_kernels
        assert generate(llm, prompts, params) == [[reference(model_dir, tuple(p), 4)] for p in prompts]
    finally:
        llm.shutdown()
