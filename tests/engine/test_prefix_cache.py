"""PrefixCache: which snapshot a prompt gets, why it misses, and the byte bound; and, through the
engine, that a shared system prompt is served from snapshots (counted against the tokens computed)."""

from __future__ import annotations

import random

import pytest
import torch

from hybridlm.cache import SlotSnapshot
from hybridlm.engine import Engine, EngineConfig, SamplingParams
from hybridlm.engine.prefix_cache import PrefixCache
from hybridlm.generation import generate
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer
from tests.helpers import tiny_config


def _snapshot(length: int, nbytes: int = 400) -> SlotSnapshot:
    return SlotSnapshot(length, [torch.zeros(nbytes // 4)])


def _add(cache: PrefixCache, prompt: list[int], length: int, nbytes: int = 400) -> None:
    cache.add(cache.hasher(prompt), _snapshot(length, nbytes))


def _lookup(cache: PrefixCache, prompt: list[int]):
    return cache.lookup(cache.hasher(prompt), len(prompt))


def test_the_longest_snapshot_that_leaves_a_token_to_compute_is_found():
    cache = PrefixCache(capacity_bytes=10_000, interval=4)
    prompt = list(range(20))
    for length in (4, 8, 13):
        _add(cache, prompt, length)
    assert _lookup(cache, [*prompt[:14], 99]).cached_tokens == 13  # off-boundary (a prompt's end) snapshot
    assert _lookup(cache, [*prompt[:12], 99]).cached_tokens == 8
    assert _lookup(cache, prompt[:13]).cached_tokens == 8  # 13 would leave no token to compute
    assert _lookup(cache, [0, 1, 2, 99, 4, 5, 6]).miss_reason == "no_snapshot"  # differs inside the first block


def test_a_prefix_is_keyed_by_every_token_before_it():
    cache = PrefixCache(capacity_bytes=10_000, interval=4)
    _add(cache, [1, 2, 3, 4, 5, 6, 7, 8], 8)
    assert _lookup(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9]).cached_tokens == 8
    assert _lookup(cache, [1, 2, 3, 4, 5, 6, 7, 0, 9]).snapshot is None
    assert _lookup(cache, [0, 2, 3, 4, 5, 6, 7, 8, 9]).snapshot is None


def test_miss_reasons():
    cache = PrefixCache(capacity_bytes=1_000, interval=4)
    assert _lookup(cache, [1, 2, 3, 4]).miss_reason == "too_short"  # no boundary before the last token
    assert _lookup(cache, [1, 2, 3, 4, 5]).miss_reason == "no_snapshot"
    _add(cache, [1, 2, 3, 4], 4, nbytes=800)
    _add(cache, [9, 9, 9, 9], 4, nbytes=800)  # does not fit beside the first: evicts it
    assert cache.evictions == 1 and len(cache) == 1 and cache.bytes == 800
    assert _lookup(cache, [1, 2, 3, 4, 5]).miss_reason == "evicted"
    assert _lookup(cache, [9, 9, 9, 9, 5]).miss_reason is None


def test_least_recently_used_is_evicted_first_and_the_bound_holds():
    cache = PrefixCache(capacity_bytes=1_200, interval=2)
    a, b, c = [1, 1, 7], [2, 2, 7], [3, 3, 7]
    _add(cache, a, 2)
    _add(cache, b, 2)
    _add(cache, c, 2)
    assert _lookup(cache, a).cached_tokens == 2  # a is now the most recently used
    _add(cache, [4, 4, 7], 2)
    assert _lookup(cache, b).miss_reason == "evicted"
    assert _lookup(cache, a).cached_tokens == 2 and _lookup(cache, c).cached_tokens == 2
    assert cache.bytes <= cache.capacity_bytes
    _add(cache, [5, 5, 7], 2, nbytes=4_000)  # larger than the whole pool: not kept, nothing evicted for it
    assert len(cache) == 3


def test_the_branch_point_is_the_last_boundary_an_earlier_prompt_shared():
    cache = PrefixCache(capacity_bytes=10_000, interval=8)
    system = list(range(50))
    assert _lookup(cache, [*system, 100, 101]).branch_point == 0  # first time: nothing seen
    assert _lookup(cache, [*system, 200, 201, 202]).branch_point == 48  # the last boundary inside the system prompt
    assert _lookup(cache, [7, *system]).branch_point == 0


def test_a_shared_system_prompt_is_served_from_the_cache_from_its_third_request():
    """Three requests share a 200-token system prompt (snapshot interval 64, a step budget that does not
    cut at 192): the second snapshots at the branch point 192, the third restores it; the prompt tokens
    the model computed drop accordingly, and every output equals the run without the cache."""
    torch.manual_seed(0)
    model = HybridLM(tiny_config("MEG*E")).eval()
    rng = random.Random(0)
    system = [rng.randrange(256) for _ in range(200)]
    prompts = [system + [rng.randrange(256) for _ in range(10)] for _ in range(3)]
    params = SamplingParams(max_tokens=3, temperature=0)

    def serve(prefix_cache_bytes: int):
        config = EngineConfig(
            max_slots=1, max_model_len=256, step_token_budget=500, prefix_cache_bytes=prefix_cache_bytes,
            snapshot_interval=64,
        )  # fmt: skip
        engine = Engine(model, ByteTokenizer(), config)
        results = []
        for prompt in prompts:
            handle = engine.submit(prompt, params)
            while engine.step():
                pass
            events = list(_events(handle))
            results.append(([e.token_id for e in events if e.token_id is not None], events[-1].cached_tokens))
        return results

    cached, plain = serve(2**26), serve(0)
    assert [tokens for tokens, _ in cached] == [tokens for tokens, _ in plain]
    assert [n for _, n in cached] == [0, 0, 192]
    assert [n for _, n in plain] == [0, 0, 0]


def _events(handle):
    while not handle._events.empty():
        yield handle._events.get()


@pytest.mark.parametrize(("capacity", "interval"), [(-1, 4), (10, 0)])
def test_bad_settings_are_refused_by_name(capacity, interval):
    with pytest.raises(ValueError, match=r"capacity_bytes|interval"):
        PrefixCache(capacity, interval)


def test_the_same_prompt_submitted_together_is_computed_once():
    """n choices of one prompt (the server submits them together): the first prefills, the others wait
    a step for its snapshot (kept with the logits after the prompt) and compute no prompt token."""
    torch.manual_seed(0)
    model = HybridLM(tiny_config("MEG*E")).eval()
    prompt = [random.Random(1).randrange(256) for _ in range(50)]
    config = EngineConfig(max_slots=3, max_model_len=128, step_token_budget=64, prefix_cache_bytes=2**26)
    engine = Engine(model, ByteTokenizer(), config)
    handles = [engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0)) for _ in range(3)]
    while engine.step():
        pass
    results = [list(_events(h)) for h in handles]
    assert [events[-1].cached_tokens for events in results] == [0, 50, 50]
    expected = generate(model, [prompt], max_new_tokens=4)[0, 50:].tolist()
    assert all([e.token_id for e in events if e.token_id is not None] == expected for events in results)
