"""The default tokenizer: UTF-8 bytes, so a model without tokenizer files still takes text."""

from __future__ import annotations


class ByteTokenizer:
    """Token id = byte value (0..255). Ids >= 256 (a larger model vocabulary) decode to nothing."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
