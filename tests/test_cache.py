"""HybridCache.reset: a used cache, once reset, holds no state and serves new sequences exactly as a fresh one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from hybridlm.cache import AttentionState, BlockState, HybridCache
from hybridlm.model import HybridLM
from tests.helpers import tiny_config

# Every block type with a state, alone, side by side (P) and all together.
PATTERNS = ["M", "G", "m", "*", "P", "MEGm*-EM"]
BATCH, MAX_LEN = 3, 16


def state_tensors(cache: HybridCache) -> Iterator[tuple[str, BlockState, Tensor]]:
    """(name, the state dataclass that holds it, tensor) for every tensor of every block's state."""

    def walk(state: BlockState, name: str) -> Iterator[tuple[str, BlockState, Tensor]]:
        for field in dataclasses.fields(state):
            value = getattr(state, field.name)
            if isinstance(value, Tensor):
                yield f"{name}.{field.name}", state, value
            else:
                yield from walk(value, f"{name}.{field.name}")

    for index, state in enumerate(cache.states):
        if state is not None:
            yield from walk(state, f"block {index} ({cache.pattern[index]})")


def left_padding(seq_len: int, pads: list[int]) -> Tensor:
    """[len(pads), seq_len] attention mask, 0 on the first pads[b] positions of row b."""
    return (torch.arange(seq_len)[None, :] >= torch.tensor(pads)[:, None]).long()


def fill(model: HybridLM, cache: HybridCache) -> None:
    """A left-padded prefill of rows of 9, 5 and 2 tokens, then two decode steps: every state is written."""
    ids = torch.randint(0, model.config.vocab_size, (BATCH, 9))
    with torch.no_grad():
        model(ids, cache=cache, attention_mask=left_padding(9, [0, 4, 7]))
        for _ in range(2):
            model(torch.randint(0, model.config.vocab_size, (BATCH, 1)), cache=cache)


def serve(model: HybridLM, cache: HybridCache, ids: Tensor) -> Tensor:
    """Logits of a prefill of ids[:, :-3] left-padded otherwise than fill's, then three decode steps."""
    prompt_len = ids.shape[1] - 3
    with torch.no_grad():
        logits = [model(ids[:, :prompt_len], cache=cache, attention_mask=left_padding(prompt_len, [2, 0, 1])).logits]
        logits += [model(ids[:, t : t + 1], cache=cache).logits for t in range(prompt_len, ids.shape[1])]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reset_zeroes_every_recurrent_state_in_place(pattern):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern)).eval()
    cache = model.new_cache(BATCH, MAX_LEN)
    fill(model, cache)
    filled = list(state_tensors(cache))
    assert filled, "the pattern has no state to reset"
    for name, owner, tensor in filled:  # the prefill really wrote every state, so zeros below mean something
        written = tensor[:, : max(cache.host_lengths)] if isinstance(owner, AttentionState) else tensor
        assert written.count_nonzero() > 0, f"{name} was not written by the prefill"
    storage = {name: tensor.data_ptr() for name, _, tensor in filled}

    cache.reset()

    assert cache.host_lengths == [0] * BATCH
    assert cache.lengths.tolist() == [0] * BATCH
    for name, owner, tensor in state_tensors(cache):
        assert tensor.data_ptr() == storage[name], f"{name} was reallocated, not overwritten"
        # KV is not cleared: a reset cache reads keys and values only up to the positions it has written
        # again since (the test below checks that those reads see nothing of the old sequences).
        if not isinstance(owner, AttentionState):
            assert tensor.count_nonzero() == 0, f"{name} keeps {tensor.count_nonzero()} nonzero entries"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reset_cache_gives_the_logits_of_a_fresh_cache(pattern):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern)).eval()
    used = model.new_cache(BATCH, MAX_LEN)
    fill(model, used)  # other sequences, other padding, positions up to 10
    used.reset()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, 7))
    # Same model, same inputs, same shapes: any difference is state that survived the reset.
    assert torch.equal(serve(model, used, ids), serve(model, model.new_cache(BATCH, MAX_LEN), ids))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_state_tensors_lists_every_tensor_of_every_block_once(pattern):
    """What a compiled step marks as fixed addresses: against a walk over the states' dataclass fields."""
    cache = HybridLM(tiny_config(pattern)).new_cache(BATCH, MAX_LEN)
    walked = [tensor for _, _, tensor in state_tensors(cache)]
    listed = cache.state_tensors()
    assert sorted(map(id, listed)) == sorted(map(id, walked))
    assert sum(t.nbytes for t in listed) == cache.nbytes()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_copy_from_continues_like_the_cache_it_copied(pattern):
    """A fresh cache that copied a filled one decodes the same logits as the filled one."""
    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern)).eval()
    filled, copy = model.new_cache(BATCH, MAX_LEN), model.new_cache(BATCH, MAX_LEN)
    fill(model, filled)
    copy.copy_from(filled)
    assert copy.host_lengths == filled.host_lengths and torch.equal(copy.lengths, filled.lengths)
    tokens = torch.randint(0, model.config.vocab_size, (BATCH,))
    with torch.no_grad():
        assert torch.equal(model.decode_step(tokens, copy), model.decode_step(tokens, filled))
