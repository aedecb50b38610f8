"""Tokenizers for checkpoint directories: ``tokenizer.json`` when there is one, else UTF-8 bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hybridlm.tokenizer import ByteTokenizer


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the small interface generation needs."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _eos_token_id(directory: Path, tokenizer: Any) -> int | None:
    """From tokenizer_config.json's eos_token, else generation_config.json, else config.json."""
    token = _read_json(directory / "tokenizer_config.json").get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    eos = _first_id(_read_json(directory / "generation_config.json").get("eos_token_id"))
    if eos is not None:
        return eos
    config = _read_json(directory / "config.json")
    eos = _first_id(config.get("eos_token_id"))
    if eos is None and isinstance(config.get("text_config"), dict):
        eos = _first_id(config["text_config"].get("eos_token_id"))
    return eos


def load_tokenizer(name_or_path: str | os.PathLike) -> HFTokenizer | ByteTokenizer:
    """A directory's ``tokenizer.json`` (with its EOS id), else the byte tokenizer (also for a preset name)."""
    directory = Path(name_or_path)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        return ByteTokenizer()
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{tokenizer_file}: cannot be read as a tokenizers file ({error})") from error
    return HFTokenizer(tokenizer, _eos_token_id(directory, tokenizer))
