"""HybridLM.decode_step: slots at different positions decode together, each as it would alone."""

from __future__ import annotations

import pytest
import torch

from hybridlm.model import HybridLM
from tests.helpers import assert_close, tiny_config

PATTERNS = ["MEGm*-EM", "*E", "ME", "GE", "mE", "P"]
CACHED_RTOL = 5e-6  # tests/test_model.py measures and explains this bound for cached vs full logits


def _model(pattern: str) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(tiny_config(pattern)).eval()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_slots_of_different_lengths_step_like_full_forwards(pattern):
    """Slots filled by separate prefills of 9, 4 and 1 tokens, then stepped together: every step's logits
    equal the last logits of a full forward over that slot's own sequence (no cache)."""
    model = _model(pattern)
    vocab = model.config.vocab_size
    lengths, steps = [9, 4, 1], 4
    prompts = [torch.randint(0, vocab, (n,)) for n in lengths]
    cache = model.new_cache(len(lengths), max(lengths) + steps)
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, prompt in enumerate(prompts):
        padded[row, -len(prompt) :], mask[row, -len(prompt) :] = prompt, 1
    with torch.no_grad():
        model(padded, cache=cache, attention_mask=mask)
        assert cache.host_lengths == lengths and cache.lengths.tolist() == lengths
        sequences = [p.tolist() for p in prompts]
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (len(lengths),))
            logits = model.decode_step(tokens, cache)
            for row, token in enumerate(tokens.tolist()):
                sequences[row].append(token)
                alone = model(torch.tensor([sequences[row]])).logits[0, -1]
                assert_close(logits[row], alone, name=f"slot {row} at position {len(sequences[row]) - 1}")
    assert cache.host_lengths == [n + steps for n in lengths]


def test_decode_step_equals_a_one_token_forward():
    model = _model("MEGm*-EM")
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    token = torch.randint(0, model.config.vocab_size, (2,))
    with torch.no_grad():
        by_forward, by_step = model.new_cache(2, 8), model.new_cache(2, 8)
        model(ids, cache=by_forward), model(ids, cache=by_step)
        expected = model(token[:, None], cache=by_forward).logits[:, -1]
        assert_close(model.decode_step(token, by_step), expected)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (torch.zeros(2, 1, dtype=torch.long), r"token_ids must be integer ids \[batch=2\], got \(2, 1\)"),
        (torch.zeros(3, dtype=torch.long), r"\[batch=2\], got \(3,\)"),
        (torch.zeros(2), r"got \(2,\) torch.float32"),
        (torch.tensor([0, 10_000]), r"input_ids\[1, 0\] = 10000 is out of range for vocab_size"),
    ],
)
def test_bad_token_ids_are_one_clear_error(tokens, message):
    model = _model("M*")
    cache = model.new_cache(2, 4)
    with pytest.raises(ValueError, match=message):
        model.decode_step(tokens, cache)


def test_a_prompt_longer_than_a_prefill_piece_gives_the_logits_of_one_forward(monkeypatch):
    """Past PREFILL_CHUNK_TOKENS a cached prefill runs in pieces; logits equal the uncached forward."""
    import hybridlm.model

    monkeypatch.setattr(hybridlm.model, "PREFILL_CHUNK_TOKENS", 8)
    model = _model("MEGm*-EM")
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 21)
        assert_close(model(ids, cache=cache).logits, full, CACHED_RTOL)
        assert cache.host_lengths == [21, 21]
        cache.reset()
        assert_close(model(ids, cache=cache, last_logits_only=True).logits, full[:, -1:], CACHED_RTOL)


@pytest.mark.parametrize("pattern", ["*E", "P"])
def test_steps_over_a_long_cache_equal_full_forwards(pattern):
    """Past LONG_CONTEXT_KEYS cached keys a step attends with grouped matmuls: slots of 300 and 290 tokens
    step like full forwards over their own sequences."""
    from hybridlm.layers.attention import LONG_CONTEXT_KEYS

    model = _model(pattern)
    vocab = model.config.vocab_size
    lengths = [LONG_CONTEXT_KEYS + 44, LONG_CONTEXT_KEYS + 34]
    padded = torch.randint(0, vocab, (2, max(lengths)))
    mask = torch.ones_like(padded)
    mask[1, : max(lengths) - lengths[1]] = 0
    cache = model.new_cache(2, max(lengths) + 2)
    with torch.no_grad():
        model(padded, cache=cache, attention_mask=mask)
        tokens = torch.randint(0, vocab, (2,))
        logits = model.decode_step(tokens, cache)
        for row, length in enumerate(lengths):
            sequence = torch.cat([padded[row, max(lengths) - length :], tokens[row : row + 1]])[None]
            assert_close(logits[row], model(sequence).logits[0, -1], CACHED_RTOL, name=f"slot {row}")
