"""FP8 KV cache against bf16 KV on the GPU, side by side in one run: decode attention, then end to end.

**decode**: the shapes of ``benchmarks/decode_attention.py`` (32 query / 8 KV heads of 128, pages of 16,
scattered pages, L2 flushed, inputs rotated over 4x L2, CUDA-graph replays timed by ``do_bench``). The same
pool of K/V is timed as bf16 pages and as E4M3 pages (``kvpage.ops.fp8.quantize`` of it, with its scale
bytes). Bytes read: bf16 ``2 * batch * context * 8 * 128 * 2``; FP8 ``2 * batch * context * 8 * (128 + 1)``
(values and scale bytes), plus queries and outputs; also as a fraction of ``dst.copy_(src)`` bandwidth.
The FP8 output is checked against the bf16 kernel's over the dequantized pool (relative error < 2e-2).

**e2e**: a random bf16 Qwen3-0.6B-shaped checkpoint (``benchmarks/offline_throughput.py``'s), the offline
workload of that benchmark cut to ``--requests`` requests (prompts and outputs uniform in [100, 1024],
ignore_eos, temperature 0.6), with ``kv_cache_memory`` fixed (``--kv-gib``) so bf16 pages must queue and
preempt. kv_cache_dtype "auto" and "fp8" alternate (``--rounds``); each run reports output tokens/s
(goodput: recomputed tokens never count), model tokens/s, the mean batch over the steps where requests
waited, preemptions and recomputed tokens.

    python benchmarks/fp8_kv.py --json $OUT/fp8_kv.json                  # both parts, about 5 minutes
    python benchmarks/fp8_kv.py --parts decode --device cpu --dry-run    # CPU smoke test (interpreter)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decode_attention as bench_decode  # noqa: E402
import offline_throughput as bench_offline  # noqa: E402

from kvpage.ops import CacheScales  # noqa: E402
from kvpage.ops.fp8 import dequantize, quantize  # noqa: E402
from kvpage.ops.triton_attention import paged_attention  # noqa: E402

MIB = 1 << 20
FP8 = torch.float8_e4m3fn


def attention_calls(sets: list[Any], key: torch.Tensor, value: torch.Tensor, scale: float,
                    scales: CacheScales | None) -> list[Any]:
    return [lambda q=q, m=m: paged_attention(q, key, value, m, scale, scales=scales) for q, m in sets]


def decode_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    timer = bench_decode.make_timer(device, 25, 100)
    copy_bps = bench_decode.copy_bandwidth(device, 8 if args.dry_run else 2048, timer)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else MIB
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = bench_decode.NUM_Q_HEADS, bench_decode.NUM_KV_HEADS, bench_decode.HEAD_DIM
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            inputs = bench_decode.Inputs.build(batch, context, 16, dtype, device, 4 * l2, 256, generator)
            key8, key_e = quantize(inputs.key_cache, FP8)
            value8, value_e = quantize(inputs.value_cache, FP8)
            scales = CacheScales(key_e, value_e)
            # The bf16 pool as the FP8 pages read back: the two kernels must then agree.
            inputs.key_cache = dequantize(key8, key_e).to(dtype)
            inputs.value_cache = dequantize(value8, value_e).to(dtype)
            scale = dim ** -0.5
            sets = list(zip(inputs.queries, inputs.metas))
            calls16 = attention_calls(sets, inputs.key_cache, inputs.value_cache, scale, None)
            calls8 = attention_calls(sets, key8, value8, scale, scales)
            error = bench_decode.relative_error(calls8[0](), calls16[0]())
            ms16, mode16 = bench_decode.time_in_graph(calls16, timer, device)
            ms8, mode8 = bench_decode.time_in_graph(calls8, timer, device)
            io = 2 * batch * heads * dim * dtype.itemsize  # queries read, outputs written
            bytes16 = 2 * batch * context * kv_heads * dim * 2 + io
            bytes8 = 2 * batch * context * kv_heads * (dim + 1) + io
            row = {"batch": batch, "context": context, "sets": len(sets), "bf16_ms": ms16, "fp8_ms": ms8,
                   "fp8_over_bf16": ms8 / ms16, "bf16_of_copy": bytes16 / (ms16 / 1e3) / copy_bps,
                   "fp8_of_copy": bytes8 / (ms8 / 1e3) / copy_bps, "fp8_error": error, "timing": [mode16, mode8]}
            assert error < bench_decode.TOLERANCE, row
            rows.append(row)
            print(f"decode batch {batch:>4} context {context:>5}: bf16 {ms16 * 1e3:8.1f} us "
                  f"({row['bf16_of_copy']:.0%} of copy), fp8 {ms8 * 1e3:8.1f} us ({row['fp8_of_copy']:.0%}), "
                  f"fp8/bf16 {ms8 / ms16:.3f}, error {error:.1e}", flush=True)
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return [{"copy_GBps": copy_bps / 1e9}, *rows]


def sweep_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """FP8 decode time under other tile sizes and warp counts (the kernel's choices, patched in)."""
    from kvpage.ops import triton_attention

    rows = []
    chosen = (triton_attention._decode_tile, triton_attention._decode_warps)
    for tile, warps in ((64, 4), (128, 4), (64, 8), (128, 8), (32, 4), (32, 2)):
        triton_attention._decode_tile = lambda block, dtype, scaled, tile=tile: tile  # type: ignore[assignment]
        triton_attention._decode_warps = lambda scaled, warps=warps: warps  # type: ignore[assignment]
        for row in decode_part(args)[1:]:
            rows.append({"tile": tile, "warps": warps, **row})
            print(f"  ^ tile {tile} warps {warps}", flush=True)
    triton_attention._decode_tile, triton_attention._decode_warps = chosen  # type: ignore[assignment]
    return rows


def e2e_run(kv_cache_dtype: str, model_dir: Path, prompts: list[list[int]], outs: list[int],
            args: argparse.Namespace) -> dict[str, Any]:
    from kvpage import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="bfloat16", device=args.device, kv_cache_memory=int(args.kv_gib * 2**30),
              kv_cache_dtype=kv_cache_dtype, max_model_len=2048, seed=0)
    construct = time.perf_counter() - t0
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]],
                 SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    before = llm.get_metrics()
    params = [SamplingParams(temperature=bench_offline.TEMPERATURE, max_tokens=m, ignore_eos=True) for m in outs]
    torch.cuda.synchronize() if args.device == "cuda" else None
    t0 = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize() if args.device == "cuda" else None
    wall = time.perf_counter() - t0
    after = llm.get_metrics()
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    assert generated == sum(outs) and after["kv_blocks_used"] == 0
    computed = after["num_tokens_computed"] - before["num_tokens_computed"]
    row = {"kv_cache_dtype": kv_cache_dtype, "wall_s": wall, "construct_s": construct,
           "output_tok_s": generated / wall, "model_tok_s": computed / wall,
           "batch_mean_loaded": after["batch_size_mean_loaded"], "batch_max": after["batch_size_max"],
           "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
           "recomputed_tokens": after["num_recomputed_tokens"] - before["num_recomputed_tokens"],
           "kv_blocks_total": after["kv_blocks_total"], "kv_bytes_per_token": after["kv_bytes_per_token"]}
    print(f"e2e {kv_cache_dtype:>5}: {row['output_tok_s']:8.0f} out tok/s, {row['model_tok_s']:8.0f} model tok/s, "
          f"loaded batch {row['batch_mean_loaded']:.1f} (max {row['batch_max']}), "
          f"{row['num_preemptions']} preemptions, {row['recomputed_tokens']} recomputed tokens, "
          f"{row['kv_blocks_total']} pages of {row['kv_bytes_per_token']} B/token, {wall:.1f} s "
          f"(built in {construct:.1f} s)", flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache() if args.device == "cuda" else None
    return row


def e2e_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    model_dir = args.model_dir
    shape = bench_offline.qwen3_shape(args.dry_run, 4096)
    if not (model_dir / "config.json").exists():
        bench_offline.build_model(model_dir, shape, args.device)
    rng = random.Random(0)
    lengths = (8, 32) if args.dry_run else (100, 1024)
    prompts = [[rng.randrange(10, shape["vocab_size"]) for _ in range(rng.randint(*lengths))]
               for _ in range(args.requests)]
    outs = [rng.randint(*lengths) for _ in range(args.requests)]
    rows = []
    for _ in range(args.rounds):
        for kv_cache_dtype in ("auto", "fp8"):
            rows.append(e2e_run(kv_cache_dtype, model_dir, prompts, outs, args))
    for key in ("output_tok_s", "batch_mean_loaded", "num_preemptions"):
        medians = {d: statistics.median(r[key] for r in rows if r["kv_cache_dtype"] == d) for d in ("auto", "fp8")}
        ratio = medians["fp8"] / medians["auto"] if medians["auto"] else math.inf
        print(f"e2e fp8/auto {key}: {ratio:.3f} (medians {medians['fp8']:.1f} / {medians['auto']:.1f})")
    return rows


def main() -> int:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="decode,e2e")
    parser.add_argument("--batches", type=ints, default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=ints, default=[512, 2048, 8192])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--kv-gib", type=float, default=2.0, help="kv_cache_memory of the e2e runs, GiB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, fp16 (a CPU under TRITON_INTERPRET)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.dry_run:
        args.batches, args.contexts = args.batches[:1], [33]
    out: dict[str, Any] = {"command": " ".join(sys.argv), "versions": bench_offline.versions(args.device)}
    parts = args.parts.split(",")
    if "decode" in parts:
        out["decode"] = decode_part(args)
    if "sweep" in parts:
        out["sweep"] = sweep_part(args)
    if "e2e" in parts:
        out["e2e"] = e2e_part(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
