"""Incremental detokenization and stop-string search."""

from __future__ import annotations

from transformers import AutoTokenizer

from kvpage.detokenizer import IncrementalDetokenizer, find_stop_string
from kvpage.model import random_model_dir


def test_streamed_text_equals_full_decode_with_multibyte_characters() -> None:
    tok = AutoTokenizer.from_pretrained(str(random_model_dir()))
    prompt = tok.encode("p")
    text = "naïve ☕ café — 日本語 ok"
    output = tok.encode(text, add_special_tokens=False)
    ids = list(prompt)
    detok = IncrementalDetokenizer(tok, ids, len(prompt))
    pieces = []
    for token in output:
        ids.append(token)
        piece = detok.update()
        assert "\ufffd" not in piece  # a split character is held back, never emitted half
        pieces.append(piece)
    detok.flush()
    assert "".join(pieces) == detok.text == text


def test_flush_emits_a_trailing_partial_character() -> None:
    tok = AutoTokenizer.from_pretrained(str(random_model_dir()))
    ids = tok.encode("x")
    detok = IncrementalDetokenizer(tok, ids, len(ids))
    ids.extend(tok.encode("é", add_special_tokens=False)[:1])  # first byte of a 2-byte character
    assert detok.update() == ""
    assert detok.flush() == "\ufffd"


def test_find_stop_string_only_looks_at_new_text() -> None:
    assert find_stop_string("abc STOP def", 4, ("STOP",)) is None  # already seen before the new text
    assert find_stop_string("abc ST", 2, ("STOP",)) is None
    assert find_stop_string("abc STOP", 2, ("STOP",)) == (4, "STOP")  # straddles old and new text
    assert find_stop_string("xxAyyB", 6, ("B", "A")) == (2, "A")  # earliest wins
