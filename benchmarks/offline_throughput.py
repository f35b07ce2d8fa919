"""End-to-end offline generation throughput: kvpage vs transformers vs the bandwidth floor, in one run.

Model: random-weight bf16 Qwen3-0.6B shape (28 layers, hidden 1024, 16/8 query/KV heads of 128, MLP 3072,
vocab 151936, tied embeddings, q/k norm, rope_theta 1e6), built on the device with transformers.
Workload (as nano-vllm and mini-sglang publish it): 256 requests, ``random.Random(0)`` draws prompt lengths
(random token ids) and max_tokens uniformly in [100, 1024]; ignore_eos, temperature 0.6, seed 0.
Throughput = generated tokens / wall time from submitting all requests to the last finish, after a short
warm-up run (compilation and graph capture stay outside; construction time is reported apart).
The systems run one after another, each freed before the next:

  kvpage        kvpage default (CUDA graphs for decode steps); kvpage-eager: with enforce_eager=True;
                kvpage-torch-sampler: sampling on the torch path, not the one-pass Gumbel-max kernel (ablation)
  hf-batch      transformers continuous batching (paged attention): the manager behind ``generate_batch``,
                driven as ``generate_batch`` drives it but with each request's own max_new_tokens
                (``generate_batch`` itself takes a single max_new_tokens for all requests)
  hf-generate   transformers padded ``model.generate`` (left padding, batches of --hf-generate-batch); each
                batch runs to its longest max_tokens, only the requested tokens count; measured on the first
                --hf-generate-requests requests, its tokens/s is extrapolated to the workload. With
                --hf-generate-max-new N each batch stops after N tokens (and requests count at most N): less
                of the padding waste of long tails, so a higher tokens/s than the full run would give
  floor         sum over decode steps of (weight bytes + KV bytes of the running requests) / copy bandwidth
                measured in the run, all requests starting together (see ``floor_seconds``)

On one H100 (about 8 minutes in all; split so each piece stays well inside a 10-minute command):

  python benchmarks/offline_throughput.py --systems kvpage,kvpage-eager --json $OUT/kvpage.json   # ~3 min
  python benchmarks/offline_throughput.py --systems hf-batch,hf-generate --json $OUT/hf.json      # ~4 min
  python benchmarks/offline_throughput.py --systems "" --merge FETCHED/kvpage.json FETCHED/hf.json  # any machine

or all at once: ``python benchmarks/offline_throughput.py --json $OUT/all.json``.
CPU smoke test: ``taskset -c 0 python benchmarks/offline_throughput.py --device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kvpage, installed or not

SYSTEMS = ("kvpage", "kvpage-eager", "kvpage-torch-sampler", "hf-batch", "hf-generate")
TEMPERATURE = 0.6
GIB = 1 << 30
Result = dict[str, Any]


def qwen3_shape(tiny: bool, max_positions: int) -> dict[str, Any]:
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim")
    sizes = (4096, 64, 192, 2, 4, 2, 16) if tiny else (151936, 1024, 3072, 28, 16, 8, 128)
    return {**dict(zip(names, sizes)), "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
            "max_position_embeddings": max_positions, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}


def weight_bytes(c: dict[str, Any]) -> int:
    """bf16 bytes of all parameters; the tied embedding counts once (the LM head reads it every step)."""
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = 2 * h * q + 2 * h * kv + 3 * h * inter + 2 * h + 2 * hd  # q,o; k,v; MLP; 2 norms; q/k norms
    return 2 * (c["num_hidden_layers"] * layer + c["vocab_size"] * h + h)


def build_model(path: Path, shape: dict[str, Any], device: str) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**shape)).bfloat16()
    assert 2 * sum(p.numel() for p in model.parameters()) == weight_bytes(shape)
    model.save_pretrained(str(path))
    del model
    free(device)


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int,
                  seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts, max_tokens = [], []
    for _ in range(n):
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))])
        max_tokens.append(rng.randint(*output_range))
    return prompts, max_tokens


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float, repeats: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of repeats, CUDA events)."""
    src = torch.ones(int(gib * GIB), dtype=torch.uint8, device=device)
    dst, times = torch.empty_like(src), []
    for _ in range(repeats + 2):  # the first two are warm-up
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    free(device)
    return 2 * int(gib * GIB) / statistics.median(times[2:])


def floor_seconds(prompt_lens: list[int], max_tokens: list[int], weights: int, kv_per_token: int,
                  bandwidth: float) -> float:
    """Ideal schedule, all requests start together: step t reads the weights once and the KV of every request
    with max_tokens >= t, which holds prompt_len + t - 1 tokens."""
    total = 0
    for t in range(1, max(max_tokens) + 1):
        total += weights + kv_per_token * sum(p + t - 1 for p, m in zip(prompt_lens, max_tokens) if m >= t)
    return total / bandwidth


def finish(name: str, counts: list[int], wanted: list[int], wall: float, construct: float, **extra: Any) -> Result:
    ok = counts == wanted
    print(f"  {name}: {sum(counts)} tokens in {wall:.2f} s; every request got exactly its max_tokens: {ok}")
    return {"system": name, "output_tokens": sum(counts), "wall_s": wall, "tok_per_s": sum(counts) / wall,
            "construct_s": construct, "counts_ok": ok, **extra}


def run_kvpage(name: str, model_dir: Path, prompts: list[list[int]], outs: list[int], warm: list[list[int]],
               args: argparse.Namespace) -> Result:
    from kvpage import LLM, SamplingParams
    options: dict[str, Any] = {"dtype": args.dtype, "device": args.device, "max_num_seqs": args.max_num_seqs,
                               "max_num_batched_tokens": args.max_num_batched_tokens, "seed": 0,
                               "max_model_len": args.max_model_len,
                               "gpu_memory_utilization": args.gpu_memory_utilization}
    if name == "kvpage-eager":  # only passed here, so the default run works on a kvpage without the option
        options["enforce_eager"] = True
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), **options)
    construct = time.perf_counter() - t0
    if name == "kvpage-torch-sampler":  # ablation: sample with the torch path instead of the one-pass kernel
        llm.engine.runner.sampler.use_kernels = False
    llm.generate([{"prompt_token_ids": p} for p in warm],
                 SamplingParams(temperature=TEMPERATURE, max_tokens=16, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=m, ignore_eos=True,
                             seed=i if args.request_seeds else None) for i, m in enumerate(outs)]
    sync(args.device)
    t0 = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(args.device)
    wall = time.perf_counter() - t0
    metrics = llm.get_metrics()
    del llm
    return finish(name, [len(r.outputs[0].token_ids) for r in results], outs, wall, construct,
                  num_preemptions=metrics.get("num_preemptions"), kv_blocks_total=metrics.get("kv_blocks_total"))


def load_hf(model_dir: Path, args: argparse.Namespace) -> Any:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, attn_implementation=args.hf_attn)
    return model.to(args.device).eval()


def hf_sampling(**extra: Any) -> Any:
    from transformers import GenerationConfig
    # top_k=0, top_p=1: plain temperature sampling, like kvpage's SamplingParams defaults
    return GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, **extra)


def hf_cb_session(model: Any, prompts: list[list[int]], outs: list[int],
                  args: argparse.Namespace) -> tuple[list[int], float, float, dict[str, Any]]:
    """One continuous-batching manager; returns (tokens per request, set-up s, generation s, its settings)."""
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(outs),
                          num_requests=len(prompts))
    cb = ContinuousBatchingConfig(max_memory_percent=args.hf_memory, num_blocks=args.hf_num_blocks,
                                  max_batch_tokens=args.max_num_batched_tokens, seed=0)
    t0 = time.perf_counter()
    with torch.no_grad(), model.continuous_batching_context_manager(
            generation_config=hf_sampling(max_new_tokens=max(outs)), continuous_batching_config=cb,
            workload_hints=hints, block=True, timeout=10) as manager:
        t1 = time.perf_counter()  # manager built, cache allocated, its warm-up done
        ids = [manager.add_request(p, max_new_tokens=m, eos_token_id=-1) for p, m in zip(prompts, outs)]
        done: dict[str, Any] = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped early")
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers request {result.request_id} failed: {result.error}")
                done[result.request_id] = result
        sync(args.device)
        t2 = time.perf_counter()
        cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
        settings = {k: getattr(cache, k, None) for k in ("num_blocks", "block_size", "max_batch_tokens")}
        settings["attn_implementation"] = model.config._attn_implementation
        settings["cuda_graphs"] = str(getattr(manager.continuous_batching_config, "use_cuda_graph", None))
    return [len(done[i].generated_tokens) for i in ids], t1 - t0, t2 - t1, settings


def run_hf_batch(model_dir: Path, prompts: list[list[int]], outs: list[int], warm: list[list[int]],
                 args: argparse.Namespace) -> Result:
    t0 = time.perf_counter()
    model = load_hf(model_dir, args)
    load = time.perf_counter() - t0
    hf_cb_session(model, warm, [16] * len(warm), args)  # warm-up manager (kernels, allocator), then a fresh one
    free(args.device)
    counts, setup, wall, settings = hf_cb_session(model, prompts, outs, args)
    print(f"  hf-batch settings: {settings}")
    del model
    return finish("hf-batch", counts, outs, wall, load + setup, settings=settings,
                  note="generate_batch's manager, per-request max_new_tokens")


def run_hf_generate(model_dir: Path, prompts: list[list[int]], outs: list[int], args: argparse.Namespace) -> Result:
    t0 = time.perf_counter()
    model = load_hf(model_dir, args)
    construct = time.perf_counter() - t0
    n, size = min(args.hf_generate_requests, len(prompts)), args.hf_generate_batch
    wall, counts, produced = 0.0, [], 0
    for start in [-1, *range(0, n, size)]:  # -1: a small warm-up batch, not timed
        stop = min(start + size, n)
        batch_p, batch_m = (prompts[:2], [4, 4]) if start < 0 else (prompts[start:stop], outs[start:stop])
        width, new = max(map(len, batch_p)), max(batch_m)
        if start >= 0 and args.hf_generate_max_new:
            new = min(new, args.hf_generate_max_new)  # a shorter run: less padding waste, in HF's favour
            batch_m = [min(m, new) for m in batch_m]
        ids = torch.zeros(len(batch_p), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch_p):  # left padding
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        sync(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                                 generation_config=hf_sampling(max_new_tokens=new, min_new_tokens=new, pad_token_id=0))
        sync(args.device)
        if start >= 0:
            wall += time.perf_counter() - t0
            generated = out.shape[1] - width  # every row runs to the batch's longest max_tokens
            produced += generated * len(batch_p)
            counts += [min(generated, m) for m in batch_m]  # what a row's request asked for (up to the cap)
    del model
    wanted = [min(m, args.hf_generate_max_new) if args.hf_generate_max_new else m for m in outs[:n]]
    result = finish("hf-generate", counts, wanted, wall, construct, subset=n, batch=size,
                    padded_tokens_generated=produced, max_new_cap=args.hf_generate_max_new)
    result["extrapolated_wall_s"] = sum(outs) / result["tok_per_s"]
    print(f"  hf-generate: {n} of {len(outs)} requests, batches of {size}: {produced} tokens generated, {sum(counts)} "
          f"asked for and counted; extrapolated workload wall {result['extrapolated_wall_s']:.1f} s")
    return result


def versions(device: str) -> dict[str, str]:
    import transformers
    try:
        import triton
    except ImportError:
        triton = None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "triton": getattr(triton, "__version__", "not installed"),
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"}


def report(data: dict[str, Any]) -> None:
    systems, floor = data["systems"], data.get("floor")
    base = systems.get("kvpage", {}).get("tok_per_s")
    print("\n| system | output tok/s | wall s | vs kvpage | construct s | note |\n|---|---:|---:|---:|---:|---|")
    for name in [s for s in SYSTEMS if s in systems]:
        r = systems[name]
        if "error" in r:
            print(f"| {name} | - | - | - | - | failed: {r['error'][:80]} |")
            continue
        note = (f"first {r['subset']} requests; extrapolated wall {r['extrapolated_wall_s']:.1f} s"
                + (f"; batches capped at {r['max_new_cap']} new tokens" if r.get("max_new_cap") else "")
                if name == "hf-generate" else r.get("note", "")) + ("" if r["counts_ok"] else " TOKEN COUNTS WRONG")
        ratio = f"{r['tok_per_s'] / base:.3f}x" if base else "-"
        print(f"| {name} | {r['tok_per_s']:.0f} | {r['wall_s']:.2f} | {ratio} | {r['construct_s']:.1f} | {note} |")
    if floor:
        ratio = f"{floor['tok_per_s'] / base:.2f}x" if base else "-"
        print(f"| floor (copy {floor['bandwidth_Bps'] / 1e12:.2f} TB/s) | {floor['tok_per_s']:.0f} | "
              f"{floor['seconds']:.2f} | {ratio} | - | weights {floor['weight_bytes'] / GIB:.2f} GiB per step |")
    kv = systems.get("kvpage", {})
    checks = [("kvpage fraction of floor (floor time / kvpage time)", 0.7,
               floor["seconds"] / kv["wall_s"] if floor and "wall_s" in kv else None)]
    for other, target in (("hf-generate", 10.0), ("hf-batch", 3.0)):
        r = systems.get(other, {})
        checks.append((f"kvpage / {other} tok/s", target, base / r["tok_per_s"] if base and "tok_per_s" in r else None))
    print()
    for label, target, value in checks:
        verdict = "n/a" if value is None else ("PASS" if value >= target else "FAIL")
        print(f"target: {label} >= {target:g}: {'-' if value is None else f'{value:.2f}'} {verdict}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    for flag in ("--num-requests", "--min-input", "--max-input", "--min-output", "--max-output"):
        p.add_argument(flag, type=int, help="default 256 requests, lengths in [100, 1024]; --tiny: 8, [8, 32]")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="kvpage; also hf-batch max_batch_tokens")
    p.add_argument("--max-model-len", type=int, help="default max(2048, max input + max output)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--request-seeds", action="store_true", help="kvpage: SamplingParams(seed=i) per request")
    p.add_argument("--hf-memory", type=float, default=0.8,
                   help="hf-batch max_memory_percent (its own default when sampling; ample for this workload)")
    p.add_argument("--hf-num-blocks", type=int, help="hf-batch KV blocks (default: sized from --hf-memory)")
    p.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation (hf-batch: paged| on top)")
    p.add_argument("--hf-generate-requests", type=int, default=64)
    p.add_argument("--hf-generate-batch", type=int, default=64)
    p.add_argument("--hf-generate-max-new", type=int, default=None,
                   help="cap hf-generate's batches at this many new tokens (fewer padded steps: favours HF)")
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--bandwidth-gib", type=float, default=2.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model, 8 short requests (CPU smoke test)")
    p.add_argument("--model-dir", type=Path, help="reuse or create the checkpoint here (default: a temp dir)")
    p.add_argument("--json", type=Path)
    p.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier --json files to add to the table")
    args = p.parse_args()
    tiny = args.tiny
    args.num_requests = args.num_requests or (8 if tiny else 256)
    args.min_input, args.min_output = args.min_input or (8 if tiny else 100), args.min_output or (8 if tiny else 100)
    args.max_input = max(args.max_input or (32 if tiny else 1024), args.min_input)
    args.max_output = max(args.max_output or (32 if tiny else 1024), args.min_output)
    args.max_model_len = args.max_model_len or max(2048, args.max_input + args.max_output)
    if tiny:  # a CPU has no free-memory probe worth trusting: keep transformers' cache small
        args.hf_num_blocks, args.bandwidth_gib = args.hf_num_blocks or 64, min(args.bandwidth_gib, 0.05)
    args.systems = [s for s in args.systems.split(",") if s]
    if set(args.systems) - set(SYSTEMS):
        p.error(f"unknown systems {sorted(set(args.systems) - set(SYSTEMS))}; choose from {SYSTEMS}")
    return args


def main() -> int:
    args = parse_args()
    data: dict[str, Any] = {"systems": {}, "floor": None, "workload": None}
    for path in args.merge:
        earlier = json.loads(path.read_text())
        print(f"# {path}: {earlier.get('versions')}")
        data["systems"].update(earlier["systems"])
        data["floor"], data["workload"] = data["floor"] or earlier["floor"], data["workload"] or earlier["workload"]
    if not args.systems:
        report(data)
        return 0

    data["versions"] = versions(args.device)
    print("# " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), flush=True)
    tmp = None if args.model_dir else tempfile.TemporaryDirectory(prefix="kvpage-qwen3-")
    model_dir = Path(tmp.name) if tmp else args.model_dir
    if (model_dir / "config.json").is_file():
        shape = json.loads((model_dir / "config.json").read_text())
    else:
        t0 = time.perf_counter()
        shape = qwen3_shape(args.tiny, max(4096, args.max_model_len))
        build_model(model_dir, shape, args.device)
        print(f"# random Qwen3 checkpoint built in {time.perf_counter() - t0:.1f} s: {model_dir}", flush=True)
    prompt_range, output_range = (args.min_input, args.max_input), (args.min_output, args.max_output)
    prompts, outs = make_workload(args.num_requests, prompt_range, output_range, shape["vocab_size"])
    warm, _ = make_workload(args.warmup_requests, prompt_range, (16, 16), shape["vocab_size"], seed=1)
    workload = {"num_requests": len(prompts), "prompt_range": list(prompt_range), "output_range": list(output_range),
                "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(outs), "temperature": TEMPERATURE}
    if data["workload"] not in (None, workload):
        print("warning: the merged results come from another workload than this run's")
    data["workload"] = workload
    print(f"# workload: {workload}", flush=True)

    bandwidth = copy_bandwidth(args.device, args.bandwidth_gib)
    weights = weight_bytes(shape)
    kv_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2  # K+V, bf16
    seconds = floor_seconds([len(q) for q in prompts], outs, weights, kv_token, bandwidth)
    data["floor"] = {"bandwidth_Bps": bandwidth, "weight_bytes": weights, "kv_bytes_per_token": kv_token,
                     "seconds": seconds, "tok_per_s": sum(outs) / seconds}
    print(f"# copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); weights {weights / GIB:.3f} GiB, "
          f"KV {kv_token} B/token; floor {seconds:.2f} s = {sum(outs) / seconds:.0f} tok/s", flush=True)

    for name in args.systems:
        print(f"# running {name}", flush=True)
        try:
            if name.startswith("kvpage"):
                result = run_kvpage(name, model_dir, prompts, outs, warm, args)
            elif name == "hf-batch":
                result = run_hf_batch(model_dir, prompts, outs, warm, args)
            else:
                result = run_hf_generate(model_dir, prompts, outs, args)
        except Exception as error:  # noqa: BLE001 - out of memory, a missing transformers API, ...: go on
            print(f"  {name} failed: {type(error).__name__}: {error}", flush=True)
            result = {"system": name, "error": f"{type(error).__name__}: {error}"}
        free(args.device)
        data["systems"][name] = result
        if args.json:  # after every system, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(data, indent=2))
    report(data)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
