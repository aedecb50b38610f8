"""The incremental detokenizer with the byte tokenizer and a real byte-level BPE tokenizer.json.

The truth is the tokenizer's own decode of all ids (what the stream must join to) and, for valid
UTF-8, the longest whole-character prefix of the bytes seen so far (what must be out after each id).
"""

from __future__ import annotations

import random

import pytest

from hybridlm.checkpoints.tokenizer import HFTokenizer, load_tokenizer
from hybridlm.tokenizer import REPLACEMENT, ByteTokenizer, IncrementalDetokenizer
from tests.helpers import gpt2_byte_symbols

TEXT = "héllo € 日本 🤖 naïve café — done"


def _stream(tokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token_id) for token_id in ids]
    return [*pieces, detokenizer.finish()]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A byte-level BPE trained here on a tiny corpus: the accented and CJK characters it never saw
    are split into single-byte tokens, as a real model's tokenizer splits rare characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    corpus = ["hello world", "the cat sat on the mat", "streaming text, token by token", "done and done"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer.save(str(directory / "tokenizer.json"))
    loaded = load_tokenizer(directory)
    assert isinstance(loaded, HFTokenizer)
    return loaded


@pytest.fixture(params=["bytes", "bpe"])
def tokenizer(request, bpe):
    return ByteTokenizer() if request.param == "bytes" else bpe


def test_the_text_really_splits_characters_across_tokens(tokenizer):
    # Decoding token by token (what streaming did before) garbles it: the case the detokenizer is for.
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert REPLACEMENT in "".join(tokenizer.decode([token_id]) for token_id in ids)


def test_stream_joins_to_the_decoded_text_without_replacement_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == TEXT
    assert not any(REPLACEMENT in piece for piece in pieces)


def test_each_character_comes_out_as_soon_as_its_last_token_arrives(tokenizer):
    ids = tokenizer.encode(TEXT)
    detokenizer = IncrementalDetokenizer(tokenizer)
    out = ""
    for count, token_id in enumerate(ids, start=1):
        out += detokenizer.add(token_id)
        prefix_bytes = _bytes_of(tokenizer, ids[:count])
        assert out == prefix_bytes.decode("utf-8", errors="ignore")  # only an incomplete tail is held back
    assert detokenizer.finish() == ""


def _bytes_of(tokenizer, ids: list[int]) -> bytes:
    if isinstance(tokenizer, ByteTokenizer):
        return bytes(ids)
    # byte-level BPE: each token is a string over the 256-symbol ByteLevel alphabet, one symbol per byte
    from tokenizers import pre_tokenizers

    symbols = gpt2_byte_symbols()
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())  # the table is the library's own
    symbol_to_byte = {symbol: index for index, symbol in enumerate(symbols)}
    return bytes(symbol_to_byte[s] for i in ids for s in tokenizer.tokenizer.id_to_token(i))


def test_random_ids_join_to_decode_of_all(tokenizer):
    # Arbitrary ids include invalid byte sequences: their U+FFFD are part of decode(all ids) and must
    # come out exactly once, at the latest from finish().
    rng = random.Random(3)
    vocab = 300 if isinstance(tokenizer, ByteTokenizer) else tokenizer.vocab_size
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_special_tokens_and_out_of_range_bytes_decode_to_nothing(bpe):
    eos = bpe.tokenizer.token_to_id("<eos>")
    ids = [*bpe.encode("日本"), eos]
    assert "".join(_stream(bpe, ids)) == "日本"
    assert "".join(_stream(ByteTokenizer(), [*"€".encode(), 256, 300])) == "€"


def test_finish_starts_afresh():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert detokenizer.add(0xE2) == ""
    assert detokenizer.finish() == REPLACEMENT  # a character that never completed
    assert [detokenizer.add(b) for b in "é".encode()] == ["", "é"]


class _RecordingByteTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.decoded_lengths: list[int] = []

    def decode(self, ids: list[int]) -> str:
        self.decoded_lengths.append(len(ids))
        return super().decode(ids)


def test_each_step_decodes_a_short_window_not_the_whole_stream():
    # A long generation must not re-decode everything per token (quadratic in its length).
    tokenizer = _RecordingByteTokenizer()
    ids = ("word € 日本 " * 300).encode()
    assert "".join(_stream(tokenizer, list(ids))) == ids.decode()
    assert max(tokenizer.decoded_lengths) <= 8  # the longest character is 4 bytes; the window holds two
