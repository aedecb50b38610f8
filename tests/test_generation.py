"""generate / stream_generate against a plain re-derivation with full forwards (no cache)."""

import re

import numpy as np
import pytest
import torch

from hybridlm.generation import generate, sample, stream_generate
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(tiny_config("MEG*-EM")).eval()


def _greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_greedy_equals_argmax_of_full_forwards(model):
    prompt = [5, 17, 200, 3, 99, 42, 7]
    out = generate(model, torch.tensor([prompt]), max_new_tokens=12)
    assert out.shape == (1, 19)
    assert out[0, 7:].tolist() == _greedy_without_cache(model, prompt, 12)


def test_batch_of_prompts_of_different_lengths(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [100, 101], [250]]
    out = generate(model, prompts, max_new_tokens=6)
    for row, prompt in enumerate(prompts):
        assert out[row, -6:].tolist() == _greedy_without_cache(model, prompt, 6)


def test_greedy_is_deterministic_and_sampling_follows_the_seed(model):
    prompt = torch.tensor([[9, 8, 7]])
    assert torch.equal(generate(model, prompt, 8), generate(model, prompt, 8))
    a = generate(model, prompt, 8, temperature=1.0, seed=3)
    b = generate(model, prompt, 8, temperature=1.0, seed=3)
    assert torch.equal(a, b)
    others = [generate(model, prompt, 8, temperature=1.0, seed=s) for s in range(4, 8)]
    assert any(not torch.equal(a, o) for o in others)


def test_stream_yields_the_tokens_of_full_forwards(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    streamed = torch.stack(list(stream_generate(model, prompts, 5)), dim=1)
    for row, prompt in enumerate(prompts):
        assert streamed[row].tolist() == _greedy_without_cache(model, prompt, 5)


def test_eos_stops_a_row_and_the_stream(model):
    prompt = [5, 17, 200]
    greedy = _greedy_without_cache(model, prompt, 6)
    eos = greedy[2]
    out = list(stream_generate(model, [prompt], 6, eos_token_id=eos))
    assert [int(t[0]) for t in out] == greedy[: greedy.index(eos) + 1]


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    generator = torch.Generator().manual_seed(0)
    assert all(int(sample(logits, 1.0, top_k=1, generator=generator)) == 1 for _ in range(20))
    # softmax -> [0.02, 0.49, 0.07, 0.42]: top_p 0.8 keeps exactly {1, 3}
    drawn = {int(sample(logits, 1.0, top_p=0.8, generator=generator)) for _ in range(200)}
    assert drawn == {1, 3}


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "hybrid ✓ Mamba"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < 256


# -- bad arguments are one ValueError naming the argument, before anything runs ---------------------------------

BAD_ARGUMENTS = [
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 2.0}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "3"}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": 256}, "eos_token_id"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_ARGUMENTS, ids=[f"{k}" for k, _ in BAD_ARGUMENTS])
@pytest.mark.parametrize("entry", [generate, stream_generate], ids=["generate", "stream_generate"])
def test_bad_sampling_argument_is_a_value_error_naming_it(model, entry, kwargs, name):
    arguments = {"max_new_tokens": 3, "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        entry(model, [[1, 2, 3]], **arguments)  # stream_generate refuses when called, not at the first next()


@pytest.mark.parametrize(
    "prompts",
    [[[1, 2.7]], [[1, "a"]], [[True, 2]], [[1, -4]], [[1, 9999]], [[]], [], "hello", torch.tensor([[0.5, 1.0]]),
     [[1, 2**70]], [[-(2**64)]]],
    ids=["float", "str", "bool", "negative", "out-of-vocab", "empty-row", "no-rows", "a-string", "float-tensor",
         "beyond-int64", "below-int64"],
)  # fmt: skip
def test_bad_prompt_is_a_value_error_naming_input_ids(model, prompts):
    with pytest.raises(ValueError, match="input_ids"):
        stream_generate(model, prompts, 2)


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, -1.0, 4.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-30, 1e-45, 1e-320, 5e-324):  # the last two are 0 once cast to float32
        assert sample(logits, temperature, generator=generator).tolist() == [1, 0]


@pytest.mark.parametrize("top_p", [1e-300, 1e-46, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    """top_p smaller than any probability keeps exactly the top token (1e-300 rounds to 0 in float32)."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, -1.0, 4.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample(logits, 1.0, top_p=top_p, generator=generator).tolist() == [1, 0]


@pytest.fixture(scope="module")
def short_context_model():
    torch.manual_seed(0)
    return HybridLM(tiny_config("M*E", max_position_embeddings=8)).eval()


def test_a_request_longer_than_the_context_is_refused_with_both_numbers(short_context_model):
    with pytest.raises(ValueError, match=r"prompt \(6 tokens\) \+ max_new_tokens \(3\) = 9 .* context of 8"):
        generate(short_context_model, [[1, 2, 3, 4, 5, 6]], 3)
    with pytest.raises(ValueError, match=r"prompt has 9 tokens, more than the model's context of 8"):
        generate(short_context_model, [list(range(9))], 1)
    assert generate(short_context_model, [[1, 2, 3, 4, 5, 6]], 2).shape == (1, 8)  # exactly the context fits


def test_allow_longer_than_context_runs_past_it(short_context_model):
    prompt = list(range(1, 10))
    out = generate(short_context_model, [prompt], 4, allow_longer_than_context=True)
    assert out[0, 9:].tolist() == _greedy_without_cache(short_context_model, prompt, 4)


def test_a_cache_that_cannot_fit_is_refused_with_its_size_before_allocating(short_context_model):
    # The attention block's keys and values, counted by hand: [batch, tokens, kv heads, head dim], fp32, K and V.
    attention = short_context_model.config.attention
    tokens = 3 + 10**12
    kv_bytes = 2 * tokens * attention.num_kv_heads * attention.head_dim * 4
    with pytest.raises(ValueError, match=r"needs ([\d,]+) bytes") as error:
        generate(short_context_model, [[1, 2, 3]], 10**12, allow_longer_than_context=True)
    needed = int(re.search(r"needs ([\d,]+) bytes", str(error.value)).group(1).replace(",", ""))
    assert kv_bytes <= needed < kv_bytes * 1.001  # the recurrent states add a few kB


def test_a_token_id_beyond_int64_is_named_before_torch_sees_it(model):
    # Before: torch.tensor raised "Overflow when unpacking long long" (a RuntimeError)
    with pytest.raises(ValueError, match=rf"input_ids\[0\]\[1\] = {2**70} is out of range"):
        generate(model, [[1, 2**70]], 2)


def test_an_attention_mask_given_as_lists_pads_like_a_tensor(model):
    # Before: an AttributeError (a list has no .shape). Row 0 is left-padded: it must generate what it would alone.
    out = generate(model, [[0, 5, 6], [7, 8, 9]], 3, attention_mask=[[0, 1, 1], [1, 1, 1]])
    assert out[0, 3:].tolist() == _greedy_without_cache(model, [5, 6], 3)
    assert out[1, 3:].tolist() == _greedy_without_cache(model, [7, 8, 9], 3)
    as_bools = generate(model, [[0, 5, 6], [7, 8, 9]], 3, attention_mask=[[False, True, True], [True, True, True]])
    assert torch.equal(as_bools, out)


BAD_MASKS = [
    ([[1.0, 0.5]], r"attention_mask\[0, 1\] = 0.5 in row 0"),
    ([[1, 1], [2, 1]], r"attention_mask\[1, 0\] = 2 in row 1"),
    ([[1, 1], [0, 0]], r"attention_mask row 1 is all zeros"),
    ([[1, float("nan")]], r"attention_mask\[0, 1\] = nan in row 0"),
    ([[1, 0]], r"attention_mask row 0 is not left-padded"),
    ([[1, 1], [1]], r"attention_mask is not a rectangular list"),
    ([[1, "a"]], r"attention_mask is not a rectangular list"),
    ("11", r"attention_mask must be a \[batch, seq_len\] tensor or a list"),
    ([[1, 1, 1]], r"attention_mask shape \(1, 3\) != input_ids shape \(1, 2\)"),
]


BAD_MASK_IDS = ["half", "two", "all-zero-row", "nan", "right-padded", "ragged", "str-value", "a-string", "wrong-shape"]


@pytest.mark.parametrize(("mask", "message"), BAD_MASKS, ids=BAD_MASK_IDS)
@pytest.mark.parametrize("entry", [generate, stream_generate], ids=["generate", "stream_generate"])
def test_a_bad_attention_mask_is_a_value_error_naming_it_and_the_row(model, entry, mask, message):
    # Before: 0.5, 2 and an all-zero row were accepted silently; a list was an AttributeError.
    rows = len(mask) if isinstance(mask, list) else 1
    with pytest.raises(ValueError, match=message):
        entry(model, [[1, 2]] * rows, 2, attention_mask=mask)


def test_numpy_scalars_are_taken_as_the_numbers_they_hold(model):
    # Before: "temperature must be a finite number >= 0 ..., got np.float32(0.5)", the same for the integers.
    plain = dict(max_new_tokens=4, temperature=0.5, top_k=5, top_p=0.75, seed=3, eos_token_id=255)
    numpy = dict(
        max_new_tokens=np.int64(4),
        temperature=np.float32(0.5),
        top_k=np.int32(5),
        top_p=np.float64(0.75),
        seed=np.uint64(3),
        eos_token_id=np.int16(255),
    )
    assert torch.equal(generate(model, [[1, 2, 3]], **numpy), generate(model, [[1, 2, 3]], **plain))
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits, np.float64(0.0), top_k=np.int64(2)).tolist() == [1]
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[1, 2, 3]], 2, temperature=1.0, top_k=np.bool_(True))
