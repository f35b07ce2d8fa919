#!/usr/bin/env python3
"""Train the demo model's byte-level BPE tokenizer on the KJV training split.

Reads ``<corpus>/train.txt`` (see prepare_corpus.py), trains a byte-level BPE
with Hugging Face ``tokenizers`` and saves it through
``transformers.PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained``
loads it:

    <out>/tokenizer.json, tokenizer_config.json (+ special_tokens_map.json if the
    installed transformers writes one)

Special tokens: ``<s>`` (id 0, BOS), ``</s>`` (id 1, EOS), ``<pad>`` (id 2).
Encoding adds ``<s>`` in front of every sequence (a TemplateProcessing post-
processor), which is how each verse is presented in training. The decoder is
the ByteLevel decoder, so decoding round-trips any text exactly.

The chat template is deliberately simple: "<s>User: ...\\nAssistant: ...</s>\\n".

Usage:  python tools/demo_model/train_tokenizer.py [--corpus .data/demo_corpus]
                                                   [--out .data/demo_tokenizer]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 4096
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
MODEL_MAX_LENGTH = 1024

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(train_file: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer=trainer)
    # ByteLevel post-processing (offset trimming) followed by adding <s> in front.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def make_portable(out: Path) -> None:
    """Keep the saved files loadable by transformers 4.4x as well as 5.x.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and the chat
    template to a separate ``chat_template.jinja``; older versions know neither.
    ``PreTrainedTokenizerFast`` and an inline ``chat_template`` load everywhere.
    """
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / ".data" / "demo_corpus")
    ap.add_argument("--out", type=Path, default=ROOT / ".data" / "demo_tokenizer")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args()

    from transformers import PreTrainedTokenizerFast

    train_file = args.corpus / "train.txt"
    if not train_file.exists():
        raise SystemExit(f"error: {train_file} not found; run tools/demo_model/prepare_corpus.py first")
    tok = build_tokenizer(train_file, args.vocab_size)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must be ids 0, 1, 2"

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    args.out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(args.out))
    make_portable(args.out)

    # Sanity checks through the public loading path.
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(args.out))
    sample = "And God said, Let there be light: and there was light.\nNaïve — ✓ 123"
    ids = loaded(sample)["input_ids"]
    assert ids[0] == loaded.bos_token_id == 0 and loaded.eos_token_id == 1
    assert loaded.decode(ids, skip_special_tokens=True) == sample, "byte-level round trip failed"
    chat = loaded.apply_chat_template(
        [{"role": "user", "content": "Who made the light?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<s>User: Who made the light?\nAssistant:", chat
    text = train_file.read_text()
    n_tokens = len(tok.encode(text.replace("\n", " ")).ids)
    print(f"saved {args.out}: vocab {tok.get_vocab_size()}, {len(text)} chars of train.txt -> "
          f"~{n_tokens} tokens ({len(text) / n_tokens:.2f} chars/token)")
    print("files:", sorted(p.name for p in args.out.iterdir()))


if __name__ == "__main__":
    main()
