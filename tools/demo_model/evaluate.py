#!/usr/bin/env python3
"""Check a demo-model directory on CPU with plain transformers (float32).

Loads the directory through ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
reports:

* ``stream`` validation perplexity: the held-out verses, each encoded as
  ``<s> verse </s>``, concatenated and cut into consecutive windows of
  ``--seq-len`` tokens (the same definition train.py logs);
* ``per-verse`` validation perplexity over the first ``--verses`` held-out
  verses, each scored on its own: input ``<s> verse``, every token after
  ``<s>`` predicted, ``</s>`` included;
* a greedy continuation of ``--prompt`` and the share of its whitespace-
  separated words that occur in the training corpus.

Usage:
    python tools/demo_model/evaluate.py [--model kvpage/assets/demo-model]
           [--corpus .data/demo_corpus] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def words(text: str) -> list[str]:
    return text.split()


def normalise(word: str) -> str:
    return re.sub(r"[^A-Za-z']", "", word).lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "kvpage" / "assets" / "demo-model")
    ap.add_argument("--corpus", type=Path, default=ROOT / ".data" / "demo_corpus")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--verses", type=int, default=100)
    ap.add_argument("--prompt", default="And God said")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    model.eval()
    load_s = time.time() - t0
    n_params = sum(p.numel() for p in model.parameters())
    bos, eos = tok.bos_token_id, tok.eos_token_id

    valid = [ln for ln in (args.corpus / "valid.txt").read_text().splitlines() if ln.strip()]
    enc = [tok(v)["input_ids"] for v in valid]  # <s> is added by the tokenizer
    assert all(e[0] == bos for e in enc)

    # stream perplexity
    stream = torch.tensor([t for e in enc for t in e + [eos]])
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for s in range(0, stream.numel() - 1, args.seq_len):
            e = min(s + args.seq_len, stream.numel() - 1)
            logits = model(input_ids=stream[s:e][None]).logits[0]
            tot += F.cross_entropy(logits, stream[s + 1:e + 1], reduction="sum").item()
            cnt += e - s
    stream_loss = tot / cnt

    # per-verse perplexity
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for e_ids in enc[: args.verses]:
            ids = torch.tensor(e_ids + [eos])
            logits = model(input_ids=ids[:-1][None]).logits[0]
            tot += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            cnt += ids.numel() - 1
    verse_loss = tot / cnt

    # greedy sample
    corpus_words = set(words((args.corpus / "train.txt").read_text()))
    corpus_norm = {normalise(w) for w in corpus_words}
    ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    t1 = time.time()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                             do_sample=False)
    gen_s = time.time() - t1
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    full = tok.decode(out[0], skip_special_tokens=True)
    ws = words(text)
    exact = sum(w in corpus_words for w in ws) / max(1, len(ws))
    norm = sum(normalise(w) in corpus_norm for w in ws) / max(1, len(ws))

    report = {
        "model": str(args.model),
        "parameters": n_params,
        "valid_stream_tokens": cnt and stream.numel(),
        "stream_val_loss": stream_loss,
        "stream_val_ppl": math.exp(stream_loss),
        "per_verse_verses": min(args.verses, len(enc)),
        "per_verse_val_loss": verse_loss,
        "per_verse_val_ppl": math.exp(verse_loss),
        "prompt": args.prompt,
        "greedy_new_tokens": int(new.numel()),
        "greedy_text": full,
        "greedy_words": len(ws),
        "greedy_words_in_corpus_exact": exact,
        "greedy_words_in_corpus_normalised": norm,
        "load_s": round(load_s, 2),
        "generate_s": round(gen_s, 2),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
