"""The default tokenizer (UTF-8 bytes, so a model without tokenizer files still takes text) and an
incremental detokenizer that turns a stream of token ids into correct text."""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


class ByteTokenizer:
    """Token id = byte value (0..255). Ids >= 256 (a larger model vocabulary) decode to nothing."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Text for a stream of token ids, one piece per ``add``, that joins to ``decode(all ids)``.

    A character may span several tokens (a byte tokenizer's "€" is three; byte-level BPE splits rare
    characters into bytes), and decoding a prefix that ends inside one gives U+FFFD. So each ``add``
    decodes a short window of recent ids and returns only the text before any trailing U+FFFD; the
    held-back part comes out once the character is complete, or from ``finish`` if it never is (a
    genuinely invalid sequence). This is vLLM's incremental detokenizer: the window starts at the
    last point where the text was complete, so decoders that treat the first token specially (a
    sentencepiece leading space) see the same first token in both decodes.

    Works with any tokenizer that has ``decode(ids) -> str`` (``ByteTokenizer``, the tokenizer.json
    wrapper in ``hybridlm.checkpoints``). One instance per sequence.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._window_start = 0  # ids[_window_start:] are decoded each step
        self._emitted = 0  # characters of that window's text already returned
        self._complete_at = 0  # the last len(ids) at which the text ended on a whole character

    def add(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ('' while a character is still partial)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids[self._window_start :])
        ready = len(text.rstrip(REPLACEMENT))
        piece = text[self._emitted : ready] if ready > self._emitted else ""
        self._emitted = max(self._emitted, ready)
        if ready == len(text):  # a whole-character boundary: restart the window at the previous one
            self._window_start, self._complete_at = self._complete_at, len(self.ids)
            self._emitted = len(self.tokenizer.decode(self.ids[self._window_start :]))
        return piece

    def finish(self) -> str:
        """What is still held back (U+FFFD for bytes that never became a character); then start afresh."""
        text = self.tokenizer.decode(self.ids[self._window_start :])
        piece = text[self._emitted :]
        self.ids, self._window_start, self._emitted, self._complete_at = [], 0, 0, 0
        return piece
