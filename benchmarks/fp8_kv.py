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
from kvpage.ops.triton_attention import DecodeTuning, paged_attention  # noqa: E402

MIB = 1 << 20
FP8 = torch.float8_e4m3fn


def attention_calls(sets: list[Any], key: torch.Tensor, value: torch.Tensor, scale: float,
                    scales: CacheScales | None, tuning: DecodeTuning | None = None) -> list[Any]:
    return [lambda q=q, m=m: paged_attention(q, key, value, m, scale, scales=scales, tuning=tuning) for q, m in sets]


class Shape:
    """One decode shape's pool, as bf16 pages and as E4M3 pages of the same values, with the byte counts."""

    def __init__(self, args: argparse.Namespace, batch: int, context: int, l2: int, generator: torch.Generator):
        device = torch.device(args.device)
        heads, kv_heads, dim = bench_decode.NUM_Q_HEADS, bench_decode.NUM_KV_HEADS, bench_decode.HEAD_DIM
        self.dtype = torch.float16 if args.dry_run else torch.bfloat16
        self.batch, self.context = batch, context
        inputs = bench_decode.Inputs.build(batch, context, 16, self.dtype, device, 4 * l2, 256, generator)
        self.key8, key_e = quantize(inputs.key_cache, FP8)
        self.value8, value_e = quantize(inputs.value_cache, FP8)
        self.scales = CacheScales(key_e, value_e)
        # The bf16 pool as the FP8 pages read back: the two kernels must then agree.
        self.key16 = dequantize(self.key8, key_e).to(self.dtype)
        self.value16 = dequantize(self.value8, value_e).to(self.dtype)
        self.scale = dim ** -0.5
        self.sets = list(zip(inputs.queries, inputs.metas))
        io = 2 * batch * heads * dim * self.dtype.itemsize  # queries read, outputs written
        self.bytes16 = 2 * batch * context * kv_heads * dim * 2 + io
        self.bytes8 = 2 * batch * context * kv_heads * (dim + 1) + io
        self.expected = self.calls(False, None)[0]()

    def calls(self, fp8: bool, tuning: DecodeTuning | None) -> list[Any]:
        if fp8:
            return attention_calls(self.sets, self.key8, self.value8, self.scale, self.scales, tuning)
        return attention_calls(self.sets, self.key16, self.value16, self.scale, None, tuning)

    def time(self, fp8: bool, tuning: DecodeTuning | None, timer: Any, device: torch.device
             ) -> tuple[float, str, float]:
        """(ms, timing mode, relative error against the default bf16 kernel)."""
        calls = self.calls(fp8, tuning)
        error = bench_decode.relative_error(calls[0](), self.expected)
        assert error < bench_decode.TOLERANCE, (self.batch, self.context, fp8, tuning, error)
        ms, mode = bench_decode.time_in_graph(calls, timer, device)
        return ms, mode, error


def _setup(args: argparse.Namespace) -> tuple[torch.device, Any, float, int]:
    device = torch.device(args.device)
    timer = bench_decode.make_timer(device, 25, 100)
    copy_bps = bench_decode.copy_bandwidth(device, 8 if args.dry_run else 2048, timer)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else MIB
    return device, timer, copy_bps, l2


def _release(device: torch.device) -> None:
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None


def decode_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    device, timer, copy_bps, l2 = _setup(args)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            shape = Shape(args, batch, context, l2, generator)
            ms16, mode16, _ = shape.time(False, None, timer, device)
            ms8, mode8, error = shape.time(True, None, timer, device)
            row = {"batch": batch, "context": context, "sets": len(shape.sets), "bf16_ms": ms16, "fp8_ms": ms8,
                   "fp8_over_bf16": ms8 / ms16, "bf16_of_copy": shape.bytes16 / (ms16 / 1e3) / copy_bps,
                   "fp8_of_copy": shape.bytes8 / (ms8 / 1e3) / copy_bps, "fp8_error": error, "timing": [mode16, mode8]}
            rows.append(row)
            print(f"decode batch {batch:>4} context {context:>5}: bf16 {ms16 * 1e3:8.1f} us "
                  f"({row['bf16_of_copy']:.0%} of copy), fp8 {ms8 * 1e3:8.1f} us ({row['fp8_of_copy']:.0%}), "
                  f"fp8/bf16 {ms8 / ms16:.3f}, error {error:.1e}", flush=True)
            del shape
            _release(device)
    return [{"copy_GBps": copy_bps / 1e9}, *rows]


# The decode kernel's tunings the sweep times, bf16 and FP8 pages each (None: the kernel's default).
SWEEP_TUNINGS: list[DecodeTuning | None] = [
    None, DecodeTuning(64, 4), DecodeTuning(64, 4, carry_pages=True), DecodeTuning(64, 2),
    DecodeTuning(64, 2, carry_pages=True), DecodeTuning(32, 1, carry_pages=True), DecodeTuning(64, 1, carry_pages=True),
    DecodeTuning(128, 2, carry_pages=True), DecodeTuning(32, 2, carry_pages=True), DecodeTuning(128, 4),
    DecodeTuning(128, 4, carry_pages=True),
]


def sweep_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every tuning of :data:`SWEEP_TUNINGS` on bf16 and FP8 pages of the same pools, shape by shape."""
    device, timer, copy_bps, l2 = _setup(args)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for batch in args.sweep_batches:
        for context in args.sweep_contexts:
            shape = Shape(args, batch, context, l2, generator)
            for tuning in SWEEP_TUNINGS:
                name = "default" if tuning is None else \
                    (f"n{tuning.block_n} w{tuning.num_warps} s{tuning.num_stages or '-'} v{tuning.waves}"
                     + (" carry" if tuning.carry_pages else ""))
                row: dict[str, Any] = {"batch": batch, "context": context, "tuning": name}
                for fp8, tag, nbytes in ((False, "bf16", shape.bytes16), (True, "fp8", shape.bytes8)):
                    try:
                        ms, _, error = shape.time(fp8, tuning, timer, device)
                    except Exception as exc:  # noqa: BLE001 - a tuning that does not compile is a row, not an end
                        row[f"{tag}_error"] = bench_decode.describe(exc)
                        continue
                    row.update({f"{tag}_us": ms * 1e3, f"{tag}_of_copy": nbytes / (ms / 1e3) / copy_bps,
                                f"{tag}_rel_error": error})
                rows.append(row)
                print(f"sweep batch {batch:>4} context {context:>5} {name:<18}: " + ", ".join(
                    f"{tag} {row[tag + '_us']:8.1f} us ({row[tag + '_of_copy']:.0%})" if tag + "_us" in row
                    else f"{tag} failed: {row[tag + '_error'][:80]}" for tag in ("bf16", "fp8")), flush=True)
            del shape
            _release(device)
    return [{"copy_GBps": copy_bps / 1e9}, *rows]


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
    parser.add_argument("--sweep-batches", type=ints, default=[64, 256])
    parser.add_argument("--sweep-contexts", type=ints, default=[2048, 8192])
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
        args.sweep_batches, args.sweep_contexts = args.batches, args.contexts
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
