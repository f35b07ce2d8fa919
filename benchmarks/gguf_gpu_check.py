"""A GGUF file on a GPU: kvpage's greedy tokens and prompt logprobs against transformers on the same device.

The device machine cannot take the whole SmolLM2 file (98 MB, over its
64 MiB of files), so this runs on its first layers
(``benchmarks/small_gguf.py``).  For each dtype kvpage loads the file itself
(``LLM(model=FILE.gguf)``), and transformers loads it on the same GPU; the
script prints, as JSON, the load time, whether the greedy tokens are
identical, and the largest prompt-logprob error.

    python benchmarks/gguf_gpu_check.py FILE.gguf [--dtypes float32,bfloat16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from kvpage import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Say hello.", "Name three primary colors.",
             "Why is the sky blue? Explain it to a child in two sentences."]


def check(path: Path, dtype: str, max_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    llm = LLM(model=str(path), dtype=dtype, device="cuda")
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=getattr(torch, dtype)).to("cuda").eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=0),
                           use_tqdm=False)
    same, worst = 0, 0.0
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to("cuda")
        with torch.no_grad():
            reference = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
            logprobs = torch.log_softmax(hf(ids).logits.float(), -1)[0]
        got = output.outputs[0].token_ids
        same += got == reference[: len(got)]
        prompt_ids = output.prompt_token_ids
        for i in range(1, len(prompt_ids)):
            mine = float(output.prompt_logprobs[i][prompt_ids[i]])
            worst = max(worst, abs(mine - logprobs[i - 1, prompt_ids[i]].item()))
    return {"dtype": dtype, "load_s": round(load_s, 2), "engine_dtype": str(llm.engine.dtype),
            "greedy_identical": f"{same}/{len(prompts)}", "prompt_logprob_max_abs_error": worst,
            "pages_in_use_after": llm.engine.kv.num_pages_in_use}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [check(Path(args.gguf), d, args.max_tokens) for d in args.dtypes.split(",")]
    text = json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
