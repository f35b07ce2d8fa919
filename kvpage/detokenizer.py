"""Incremental detokenization of a growing token stream.

Decoding only the newest token is wrong for many tokenizers: a byte-level
token can end mid-character, and SentencePiece drops a word's leading space
when it starts the decoded text. So each update decodes a short window that
begins a few tokens back (``prefix_offset``), subtracts the text of the window
without the new tokens, and holds back output that ends in an incomplete
character (U+FFFD) until the next token completes it.
"""

from __future__ import annotations

from typing import Protocol

# How many already-emitted tokens to decode again as context.
CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Text of the output tokens of one sequence, extended one step at a time."""

    def __init__(self, tokenizer: Decoder, token_ids: list[int], num_prompt_tokens: int,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.token_ids = token_ids  # the sequence's live list: prompt then output
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = max(0, num_prompt_tokens - CONTEXT_TOKENS)
        self.read_offset = num_prompt_tokens
        self.text = ""
        self.frozen = False

    def freeze(self, text: str) -> None:
        """Fix the final text (cut at a stop string); later updates add nothing."""
        self.text = text
        self.frozen = True

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def update(self) -> str:
        """Catch up with the token list; returns the newly completed text."""
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of a sequence, emit whatever was held back (even a partial character)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        end = len(self.token_ids)
        if self.frozen or end <= self.read_offset:
            return ""
        before = self._decode(self.prefix_offset, self.read_offset)
        after = self._decode(self.prefix_offset, end)
        if final:
            new_text = after[len(before):] if after.startswith(before) else ""
        elif len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character: wait for the token that completes it
        else:
            new_text = after[len(before):]
        self.prefix_offset = max(self.prefix_offset, end - CONTEXT_TOKENS)
        self.read_offset = end
        self.text += new_text
        return new_text


def find_stop_string(text: str, num_new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends in the newest ``num_new_chars`` characters: (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        # A match must end inside the new text, so it starts at most len(stop) - 1 characters before it.
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
