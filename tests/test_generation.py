"""generate / stream_generate against a plain re-derivation with full forwards (no cache)."""

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


def test_stream_yields_the_same_tokens_as_generate(model):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    streamed = torch.stack(list(stream_generate(model, prompt, 5)), dim=1)
    assert torch.equal(streamed, generate(model, prompt, 5)[:, 3:])


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
