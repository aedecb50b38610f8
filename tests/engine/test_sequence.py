"""A request's text and stop conditions: the events a stream of tokens gives, against the text written out."""

from __future__ import annotations

import pytest
import torch

from hybridlm.engine import SamplingParams
from hybridlm.engine.requests import RequestError
from hybridlm.engine.sequence import Sequence
from hybridlm.tokenizer import ByteTokenizer

EOS = 3  # a byte id used as EOS in these tests


def _feed(text: str, eos: int | None = EOS, **params) -> tuple[list[str], str | None, int]:
    events = []
    seq = Sequence("r", [65], SamplingParams(**{"max_tokens": 100, **params}), ByteTokenizer(), eos, events.append)
    for token in text.encode("utf-8"):
        if seq.finish_reason is not None:
            break
        seq.append(token, None)
    if seq.finish_reason is None:
        seq.finish("length")
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason is not None
    return [e.text for e in events], events[-1].finish_reason, events[-1].completion_tokens


def test_the_stream_joins_to_the_whole_text_and_multibyte_characters_come_out_whole():
    pieces, reason, count = _feed("naïve € ok")
    assert "".join(pieces) == "naïve € ok" and reason == "length" and count == len("naïve € ok".encode())
    assert "\ufffd" not in "".join(pieces) and "€" in pieces  # three bytes, one piece


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed_in_part():
    pieces, reason, _ = _feed("hello END world", stop=("END",))
    assert "".join(pieces) == "hello " and reason == "stop"
    assert all("E" not in piece for piece in pieces)  # "E", "EN" were held back, then dropped with the stop


def test_text_held_back_for_a_stop_string_that_does_not_come_is_released():
    pieces, reason, _ = _feed("abc EN", stop=("END",))
    assert "".join(pieces) == "abc EN" and reason == "length"
    assert pieces[-1] == "EN"  # held back until the request ended


def test_the_earliest_of_several_stop_strings_wins():
    pieces, _, _ = _feed("one two three", stop=("three", "two"))
    assert "".join(pieces) == "one "


def test_eos_and_stop_token_ids_end_the_request_without_their_text():
    pieces, reason, count = _feed("ab\x03cd")
    assert "".join(pieces) == "ab" and reason == "stop" and count == 3  # EOS is counted as a generated token
    pieces, reason, _ = _feed("ab\x03cd", ignore_eos=True)
    assert "".join(pieces) == "ab\x03cd" and reason == "length"
    pieces, reason, _ = _feed("abXcd", eos=None, stop_token_ids=(ord("X"),))
    assert "".join(pieces) == "ab" and reason == "stop"


def test_max_tokens_ends_with_length():
    pieces, reason, count = _feed("abcdef", max_tokens=4)
    assert "".join(pieces) == "abcd" and reason == "length" and count == 4


def test_logprobs_are_log_softmax_of_the_logits_with_the_top_ids():
    seq = Sequence("r", [1], SamplingParams(logprobs=2), ByteTokenizer(), None, lambda e: None)
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    entry = seq.logprob_of(logits, 2)
    expected = torch.log_softmax(logits, -1)
    assert entry.token_id == 2 and entry.logprob == pytest.approx(float(expected[2]))
    assert list(entry.top) == [1, 2] and entry.top[1] == pytest.approx(float(expected[1]))


def test_a_seed_makes_sampling_repeat_and_temperature_zero_is_the_argmax():
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0))

    def draws(seed):
        seq = Sequence("r", [1], SamplingParams(temperature=1.0, seed=seed), ByteTokenizer(), None, lambda e: None)
        return [seq.choose(logits, int(logits.argmax())) for _ in range(20)]

    assert draws(7) == draws(7) and draws(7) != draws(8)
    greedy = Sequence("r", [1], SamplingParams(temperature=0), ByteTokenizer(), None, lambda e: None)
    assert greedy.choose(logits, int(logits.argmax())) == int(logits.argmax())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", True),
        ("seed", "7"),
        ("stop", ("",)),
        ("logprobs", 21),
    ],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(RequestError) as error:
        SamplingParams(**{field: value}).check()
    assert error.value.param == field and field in str(error.value)
