"""Token ids -> text pieces as they are generated, without splitting a multi-byte character.

A byte-level BPE token can end in the middle of a UTF-8 sequence; the decoded text then ends in
U+FFFD until the next token completes it. ``push`` holds such text back; ``flush`` returns whatever
is left when generation stops (so a final incomplete character is not lost silently: it comes out
as U+FFFD, which is what the bytes decode to).
"""
from __future__ import annotations

from typing import Iterable, Iterator, List

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: List[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        return self._advance(text)

    def pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """Every non-empty piece of ``tokens`` as they come, then what is left at the end."""
        for token in tokens:
            piece = self.push(token)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail

    def flush(self) -> str:
        if not self.tokens:
            return ""
        return self._advance(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece

    @property
    def text(self) -> str:
        return self.emitted
