"""Paged decode attention: kvpage's Triton kernel against the memory-bandwidth limit and FlexAttention.

Each sequence of a batch decodes one token over ``context`` cached tokens (bf16, 32 query heads,
8 KV heads, head_dim 128, pages of 16 tokens). Decode must read all its K/V once, so the measure is
bandwidth, ``(batch * context * 8 * 128 * 2 bytes * 2 (K, V) + query + output bytes) / time``, also as
a fraction of a 2 GiB ``dst.copy_(src)`` (bytes read + written) timed in the same run.

* Pages are scattered (page tables from a random permutation of a pool of pages filled with
  ``torch.randn``) and queries are fresh for every size.
* No L2 reuse: ``do_bench`` flushes L2 before each timed call, and the timed function rotates among
  ``sets`` (page tables, query) sets on disjoint pages, enough for their K/V to exceed ``--rotate-mib``
  (default 4x L2). Times are CUDA-event medians (``triton.testing.do_bench``) after warm-up; metadata
  and its device arrays (``meta.kernel``) are built before timing. Each system is timed as replays of
  one CUDA graph that makes one call per set (device time: without it, the host's launch cost, not the
  kernel, sets the time at small sizes); ``*_timing`` in the JSON says "graph", or why it fell back.
* FlexAttention runs ``PagedAttention`` (``torch.nn.attention.experimental._paged_attention``) with
  ``flex_attention`` under ``torch.compile(dynamic=False)``, on a copy of the same pool in its
  ``[1, Hkv, pages * page_size, D]`` layout with the same page ids and queries. Its decode kernel cuts
  a sequence's keys into splits by the *pool* length when the mask has "full" blocks but by the
  sequence's length when all blocks are "partial" (the page-table mask_mod then runs on every block),
  so both masks are timed (``--flex-masks``) and the faster is compared. Outputs are checked: Flex's
  against kvpage's, kvpage's against its torch reference (first sequences), relative error < 2e-2.

On the GPU, from the repository root (defaults: --batches 1,16,64,256 --contexts 512,2048,8192
--block-size 16 --dtype bf16; also --splits-sweep, --no-flex, --flex-masks partial). Flex compiles
once per size and mask (24 by default) and these dominate the run time:

    python benchmarks/decode_attention.py --json decode_attention.json

Dry run on a CPU (the Triton interpreter mishandles bf16):

    TRITON_INTERPRET=1 python benchmarks/decode_attention.py --device cpu --dtype fp16 \
        --batches 1,3 --contexts 33 --rotate-mib 1 --copy-mib 8
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import itertools
import json
import math
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kvpage, installed or not
from kvpage.ops.attention import paged_attention as reference_attention
from kvpage.ops.metadata import AttentionMetadata
from kvpage.ops.triton_attention import decode_num_splits, paged_attention

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = 2e-2  # relative error (Frobenius) between implementations
MIB = 1 << 20
SWEEP_SPLITS = (1, 2, 4, 8, 16)
FLEX_Q_BLOCK = 128  # sparse query block of the mask: a multiple of Flex's 16-row decode tile
Timer = Callable[[Callable[[], Any]], float]


def parse_args() -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=ints, default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=ints, default=[512, 2048, 8192])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--splits-sweep", action="store_true", help="also time num_splits=1,2,4,8,16")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--flex-masks", default="partial,full", help="Flex block masks to time: partial,full")
    parser.add_argument("--rotate-mib", type=float, default=None, help="K/V MiB to rotate over (4x L2)")
    parser.add_argument("--max-sets", type=int, default=256, help="cap on rotated input sets")
    parser.add_argument("--copy-mib", type=int, default=2048, help="size of the copied tensor")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this path")
    return parser.parse_args()


def make_timer(device: torch.device, warmup: int, rep: int) -> Timer:
    """Median milliseconds of ``fn``: CUDA events via do_bench on a GPU, a wall clock for dry runs."""
    def timer(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        fn()
        return statistics.median(timeit.repeat(fn, number=1, repeat=3)) * 1e3
    return timer


def time_in_graph(calls: list[Callable[[], Any]], timer: Timer, device: torch.device) -> tuple[float, str]:
    """Milliseconds per call, from replays of one CUDA graph that makes every call once.

    A graph removes the host's launch cost (tens of microseconds of Python per call, more than the
    kernels take at small sizes), so this is device time, as inside the engine's own decode graphs.
    Falls back to timing the calls one by one, in rotation, where capture fails (said in the mode).
    """
    if device.type != "cuda":
        return timer(cycle(calls)), "eager"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up away from the capture stream, as torch recommends
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        return timer(graph.replay) / len(calls), "graph"
    except Exception as error:  # noqa: BLE001 - reported in the results
        torch.cuda.synchronize()
        return timer(cycle(calls)), f"eager ({describe(error)})"


def cycle(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    """A function that makes the next call of ``calls``, in rotation, each time it is called."""
    rotation = itertools.cycle(calls)
    return lambda: next(rotation)()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def describe(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {' | '.join(lines[:3])}"[:300]


@dataclass
class Inputs:
    """``sets`` (page tables, query) sets over disjoint scattered pages of one randomly filled pool."""

    key_cache: torch.Tensor  # [pages, block_size, Hkv, D]
    value_cache: torch.Tensor
    pages: list[torch.Tensor]  # per set: [batch, pages_per_seq] int64, on the device
    queries: list[torch.Tensor]  # per set: [batch, Hq, D]
    metas: list[AttentionMetadata]
    context: int

    @classmethod
    def build(cls, batch: int, context: int, block_size: int, dtype: torch.dtype, device: torch.device,
              rotate_bytes: float, max_sets: int, generator: torch.Generator) -> Inputs:
        per_seq = math.ceil(context / block_size)
        set_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize * 2
        sets = max(1, min(max_sets, math.ceil(rotate_bytes / set_bytes)))
        shape = (sets * batch * per_seq, block_size, NUM_KV_HEADS, HEAD_DIM)
        key_cache = torch.randn(shape, dtype=dtype, device=device)
        value_cache = torch.randn(shape, dtype=dtype, device=device)
        tables = torch.randperm(shape[0], generator=generator).view(sets, batch, per_seq)
        metas = []
        for table in tables:
            meta = AttentionMetadata.build([1] * batch, [context] * batch, table.tolist(), block_size, device=device)
            _ = meta.kernel  # the kernels' device arrays, built now rather than in the first timed call
            metas.append(meta)
        queries = [torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=dtype, device=device) for _ in range(sets)]
        return cls(key_cache, value_cache, list(tables.to(device)), queries, metas, context)


def copy_bandwidth(device: torch.device, mib: int, timer: Timer) -> float:
    """Bytes per second of ``dst.copy_(src)`` for a ``mib`` MiB tensor, counting bytes read and written."""
    src = torch.randn(mib * MIB // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (timer(lambda: dst.copy_(src)) / 1e3)


def logical_block_mask(batch: int, context: int, block_size: int, device: torch.device, full: bool) -> Any:
    """Every sequence sees its logical pages ``0..n-1``: all as "partial" blocks, or full pages as "full" ones."""
    from torch.nn.attention.flex_attention import BlockMask

    num_blocks = math.ceil(context / block_size)
    num_full = context // block_size if full else 0
    order = torch.arange(num_blocks, dtype=torch.int32, device=device)
    rows = lambda t: t.expand(batch, 1, 1, num_blocks).contiguous()
    counts = lambda n: torch.full((batch, 1, 1), n, dtype=torch.int32, device=device)
    return BlockMask.from_kv_blocks(
        counts(num_blocks - num_full), rows(torch.roll(order, -num_full)),
        counts(num_full) if full else None, rows(order) if full else None,
        BLOCK_SIZE=(FLEX_Q_BLOCK, block_size), seq_lengths=(1, context))


def flex_calls(inputs: Inputs, flex: Callable[..., torch.Tensor], full: bool, scale: float
               ) -> list[Callable[[], torch.Tensor]]:
    """One FlexAttention paged-attention call per input set, on a copy of the pool in Flex's layout."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention

    num_pages, block_size, heads, dim = inputs.key_cache.shape
    device = inputs.key_cache.device
    layout = lambda cache: cache.view(-1, heads, dim).transpose(0, 1).unsqueeze(0).contiguous()
    key, value = layout(inputs.key_cache), layout(inputs.value_cache)  # [1, Hkv, pages * block_size, D]
    batch, per_seq = inputs.pages[0].shape
    logical = logical_block_mask(batch, inputs.context, block_size, device, full)
    kv_len = torch.full((batch,), inputs.context, dtype=torch.int64, device=device)
    takes_kv_len = "kv_len" in inspect.signature(PagedAttention.convert_logical_block_mask).parameters
    calls = []
    for pages, query in zip(inputs.pages, inputs.queries):
        paged = PagedAttention(num_pages, block_size, batch, device=str(device))
        paged.page_table[:, :per_seq] = pages
        paged.physical_to_logical.scatter_(1, pages, torch.arange(per_seq, device=device).expand(batch, -1))
        paged.capacity.fill_(per_seq * block_size)
        if hasattr(paged, "seq_lens"):  # versions whose mask_mod bounds keys by paged.seq_lens, not kv_len
            paged.seq_lens.fill_(inputs.context)
        mask = (paged.convert_logical_block_mask(logical, kv_len=kv_len) if takes_kv_len
                else paged.convert_logical_block_mask(logical))
        calls.append(functools.partial(flex, query.unsqueeze(2), key, value, block_mask=mask, scale=scale,
                                       enable_gqa=True))
    return calls


def no_recompiles() -> contextlib.AbstractContextManager[Any]:
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("fail_on_recompile") if set_stance is not None else contextlib.nullcontext()


def time_flex(inputs: Inputs, expected: list[torch.Tensor], full: bool, scale: float, timer: Timer
              ) -> dict[str, Any]:
    """Compile Flex paged attention, check it against kvpage's outputs (first and last set), time it."""
    from torch.nn.attention.flex_attention import flex_attention

    calls = flex_calls(inputs, torch.compile(flex_attention, dynamic=False), full, scale)
    start = time.perf_counter()
    first = calls[0]()
    result: dict[str, Any] = {"compile_s": round(time.perf_counter() - start, 1), "note": ""}
    try:  # every other set must reuse the compiled kernel
        with no_recompiles():
            outputs = [call() for call in calls]
    except Exception as error:  # noqa: BLE001 - it recompiles per page table: time the first set alone
        result["note"], calls, outputs = f"no rotation: {describe(error)}", calls[:1], [first]
    result["rel_err_vs_kvpage"] = max(relative_error(outputs[i][:, :, 0], expected[i])
                                      for i in {0, len(outputs) - 1})
    if result["rel_err_vs_kvpage"] > TOLERANCE:
        raise RuntimeError(f"output differs from kvpage's: relative error {result['rel_err_vs_kvpage']:.3g}")
    with no_recompiles() if not result["note"] else contextlib.nullcontext():
        result["ms"], result["timing"] = time_in_graph(calls, timer, inputs.key_cache.device)
    return result


def measure(args: argparse.Namespace, batch: int, context: int, rotate_bytes: float, copy_bps: float,
            timer: Timer, generator: torch.Generator) -> dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    inputs = Inputs.build(batch, context, args.block_size, dtype, device, rotate_bytes, args.max_sets, generator)
    scale = HEAD_DIM ** -0.5
    moved = (batch * context * NUM_KV_HEADS * HEAD_DIM * 2 + 2 * batch * NUM_Q_HEADS * HEAD_DIM) * dtype.itemsize
    row: dict[str, Any] = {"batch": batch, "context": context, "sets": len(inputs.metas), "bytes": moved,
                           "num_splits": decode_num_splits(batch, NUM_KV_HEADS, device)}

    def kvpage(num_splits: int | None) -> list[Callable[[], torch.Tensor]]:
        return [functools.partial(paged_attention, query, inputs.key_cache, inputs.value_cache, meta, scale,
                                  num_splits=num_splits) for query, meta in zip(inputs.queries, inputs.metas)]

    outputs = [call() for call in kvpage(None)]  # compiles the kernels; one output per set
    few = min(batch, 4)  # the torch reference on the first sequences of the first set
    reference_meta = AttentionMetadata.build([1] * few, [context] * few, inputs.pages[0][:few].tolist(),
                                             args.block_size, device=device, backend="torch")
    expected = reference_attention(inputs.queries[0][:few], inputs.key_cache, inputs.value_cache, reference_meta,
                                   scale)
    row["rel_err_vs_reference"] = relative_error(outputs[0][:few], expected)
    if row["rel_err_vs_reference"] > TOLERANCE:
        raise RuntimeError(f"kvpage differs from its torch reference: {row['rel_err_vs_reference']:.3g}")
    row["kvpage_ms"], row["kvpage_timing"] = time_in_graph(kvpage(None), timer, device)
    row["kvpage_gbs"] = moved / row["kvpage_ms"] / 1e6
    row["kvpage_frac_copy"] = row["kvpage_gbs"] * 1e9 / copy_bps
    if args.splits_sweep:
        row["splits_ms"] = {str(splits): time_in_graph(kvpage(splits), timer, device)[0] for splits in SWEEP_SPLITS}
    row["flex"] = {}
    for mask in [] if args.no_flex else [name for name in args.flex_masks.split(",") if name]:
        try:
            row["flex"][mask] = time_flex(inputs, outputs, mask == "full", scale, timer)
        except Exception as error:  # noqa: BLE001 - reported; one failure must not end the run
            row["flex"][mask] = {"error": describe(error)}
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = {mask: flex for mask, flex in row["flex"].items() if "ms" in flex}
    if timed:
        row["flex_mask"] = min(timed, key=lambda mask: timed[mask]["ms"])
        row["flex_ms"] = timed[row["flex_mask"]]["ms"]
        row["flex_frac_copy"] = moved / row["flex_ms"] / 1e-3 / copy_bps
        row["speedup_vs_flex"] = row["flex_ms"] / row["kvpage_ms"]
    return row


def print_tables(rows: list[dict[str, Any]], splits_sweep: bool) -> None:
    print("\n| batch | context | sets | splits | kvpage µs | GB/s | % of copy BW | flex µs (mask) "
          "| flex % of copy BW | speedup vs flex |\n" + "|---:" * 10 + "|")
    for r in rows:
        if "kvpage_ms" not in r:
            print(f"| {r['batch']} | {r['context']} | | | failed | | | | | |")
            continue
        flex = (f"{r['flex_ms'] * 1e3:.1f} ({r['flex_mask']}) | {100 * r['flex_frac_copy']:.1f} | "
                f"{r['speedup_vs_flex']:.2f}x" if "flex_ms" in r else "n/a | n/a | n/a")
        print(f"| {r['batch']} | {r['context']} | {r['sets']} | {r['num_splits']} | {r['kvpage_ms'] * 1e3:.1f} | "
              f"{r['kvpage_gbs']:.0f} | {100 * r['kvpage_frac_copy']:.1f} | {flex} |")
    for r in rows:  # errors, FlexAttention timed without rotation, timings outside a CUDA graph
        for who, flex in [("run", r), *((f"flex {mask}", flex) for mask, flex in r.get("flex", {}).items())]:
            if flex.get("error") or flex.get("note"):
                print(f"batch {r['batch']} context {r['context']}, {who}: {flex.get('error') or flex['note']}")
            timing = flex.get("kvpage_timing" if who == "run" else "timing", "graph")
            if timing != "graph":
                print(f"batch {r['batch']} context {r['context']}, {who} timed {timing}")
    if splits_sweep:
        print("\n| batch | context | " + " | ".join(f"splits={s} µs" for s in SWEEP_SPLITS) + " |\n|---:|---:|"
              + "---:|" * len(SWEEP_SPLITS))
        for r in (r for r in rows if "splits_ms" in r):
            times = " | ".join(f"{ms * 1e3:.1f}" for ms in r["splits_ms"].values())
            print(f"| {r['batch']} | {r['context']} | {times} |")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    l2_bytes = getattr(gpu, "L2_cache_size", 50 * MIB) if gpu is not None else 50 * MIB
    rotate_bytes = args.rotate_mib * MIB if args.rotate_mib is not None else 4 * l2_bytes
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": gpu.name if gpu else str(device), "multiprocessors": gpu.multi_processor_count if gpu else None,
            "l2_mib": l2_bytes / MIB}
    print(" ".join(f"{key}={value}" for key, value in info.items()), flush=True)
    timer = make_timer(device, args.warmup, args.rep)
    copy_bps = copy_bandwidth(device, args.copy_mib, timer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"copy bandwidth ({args.copy_mib} MiB dst.copy_(src), read + write): {copy_bps / 1e9:.0f} GB/s; "
          f"rotating over >= {rotate_bytes / MIB:.1f} MiB of K/V", flush=True)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            start = time.perf_counter()
            try:
                row = measure(args, batch, context, rotate_bytes, copy_bps, timer, generator)
            except Exception as error:  # noqa: BLE001 - reported in the table
                row = {"batch": batch, "context": context, "error": describe(error)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row["wall_s"] = round(time.perf_counter() - start, 1)
            shown = {key: row[key] for key in ("sets", "kvpage_ms", "flex_ms", "wall_s", "error") if key in row}
            shown.update({f"flex_{mask}_compile_s": flex.get("compile_s")
                          for mask, flex in row.get("flex", {}).items()})
            print(f"batch {batch} context {context}: {json.dumps(shown)}", flush=True)
            rows.append(row)
    print_tables(rows, args.splits_sweep)
    if args.json:
        config = {key: value for key, value in vars(args).items() if key != "json"}
        with open(args.json, "w") as handle:
            json.dump({"info": info, "config": config, "copy_gbs": copy_bps / 1e9, "results": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
