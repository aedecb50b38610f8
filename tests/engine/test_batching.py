"""The engine's continuous batching against generating each request alone (``hybridlm.generation``).

Requests arrive at different steps with prompts of different lengths, under a small step budget so
prompts are prefilled in pieces while others decode; every request's greedy tokens must equal
``generate`` on that prompt alone, for every block type. The reference path shares no engine code:
one left-padded forward over the whole prompt, then ``decode_step`` on a cache of its own.
"""

from __future__ import annotations

import random

import pytest
import torch

from hybridlm.engine import Engine, EngineConfig, SamplingParams
from hybridlm.generation import generate
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer
from tests.helpers import tiny_config

# Each block type at least once; '-' and 'E' ride along with the mixers.
PATTERNS = ["M-", "GE", "m-", "*E", "P-", "MEGm*-EP"]
NEW_TOKENS = 6
# cached pieces vs one full forward: tests/test_model.py bounds cached logits at 5e-6 relative
LOGPROB_RTOL = 5e-6


def _model(pattern: str) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(tiny_config(pattern)).eval()


def _prompts(count: int, seed: int, shortest: int = 1, longest: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(shortest, longest))] for _ in range(count)]


def _alone(model: HybridLM, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    return generate(model, [prompt], max_new_tokens=new_tokens)[0, len(prompt) :].tolist()


def _run_staggered(engine: Engine, prompts: list[list[int]], arrivals: list[int], params: SamplingParams):
    """Submit prompt i at step arrivals[i]; step until every request ends. Returns each one's tokens
    and, per step, the number of running sequences (to check the batch really was mixed)."""
    handles: dict[int, object] = {}
    running_per_step = []
    step = 0
    while len(handles) < len(prompts) or engine.scheduler.has_work():
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                handles[i] = engine.submit(prompts[i], params)
        engine.step()
        running_per_step.append(len(engine.scheduler.running))
        step += 1
        assert step < 10_000
    events = [[e for e in _drain(handles[i]) if e.token_id is not None] for i in range(len(prompts))]
    if params.logprobs is not None:
        return [[(e.token_id, e.logprob.logprob) for e in evs] for evs in events], running_per_step
    return [[e.token_id for e in evs] for evs in events], running_per_step


def _drain(handle):
    events = []
    while not handle._events.empty():
        events.append(handle._events.get())
    assert events and events[-1].finish_reason is not None
    return events


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    ("budget", "arrivals"),
    [
        (24, [0, 0, 1, 3, 3, 6, 9]),  # prompts in pieces of a few tokens, one slot at a time
        (200, [0, 0, 0, 4, 4, 4, 5]),  # fresh prompts arriving together share left-padded forwards
    ],
)
def test_a_mixed_staggered_batch_generates_what_each_request_would_alone(pattern, budget, arrivals):
    model = _model(pattern)
    prompts = _prompts(7, seed=1)
    engine = Engine(
        model,
        ByteTokenizer(),
        EngineConfig(max_slots=3, max_model_len=128, step_token_budget=budget, prefix_cache_bytes=0),
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0)
    outputs, running = _run_staggered(engine, prompts, arrivals, params)
    assert max(running) == 3  # the pool was full: requests waited, joined and left while others ran
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens = [token for token, _ in output]
        assert tokens == _alone(model, prompt), f"prompt of {len(prompt)} tokens"
        # each token's logprob, against a full forward (no cache) over the prompt and the tokens before it
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()
        assert [lp for _, lp in output] == pytest.approx(expected, rel=LOGPROB_RTOL, abs=LOGPROB_RTOL)
    assert engine.scheduler.free_slots == 3 and not engine.scheduler.waiting


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_prefix_cache_changes_no_output(pattern):
    """Prompts sharing prefixes of several lengths (on and off the snapshot boundaries), run with and
    without the prefix cache: identical tokens, and the cache really served some prompt tokens."""
    model = _model(pattern)
    rng = random.Random(2)
    system = [rng.randrange(256) for _ in range(37)]
    prompts = [system + p for p in _prompts(5, seed=3, longest=20)]
    prompts += [prompts[0] + [5, 6, 7], prompts[0], system[:20]]  # a continuation, a repeat, a short one
    arrivals = [0, 1, 4, 5, 9, 12, 13, 14]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)

    def run(prefix_cache_bytes: int) -> tuple[list[list[int]], Engine]:
        config = EngineConfig(
            max_slots=2, max_model_len=128, step_token_budget=16, prefix_cache_bytes=prefix_cache_bytes,
            snapshot_interval=8,
        )  # fmt: skip
        engine = Engine(model, ByteTokenizer(), config)
        return _run_staggered(engine, prompts, arrivals, params)[0], engine

    without, _ = run(0)
    with_cache, engine = run(2**26)
    assert with_cache == without
    assert without == [_alone(model, p) for p in prompts]
    assert len(engine.prefix_cache) > 0 and engine.prefix_cache.bytes > 0


def test_a_reused_slot_carries_nothing_of_its_previous_owner():
    """One slot, used by a long request and then by a shorter one: the second's tokens and their
    logprobs equal its own run on a fresh engine (the first owner's conv, recurrent and KV state are
    gone; logprobs, not only tokens, so a state difference too small to flip a token still shows)."""
    model = _model("MEGm*-EP")
    first, second = _prompts(1, seed=4, shortest=60, longest=60)[0], _prompts(1, seed=5, shortest=40, longest=40)[0]
    config = EngineConfig(max_slots=1, max_model_len=128, step_token_budget=16, prefix_cache_bytes=0)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0)

    def run(engine: Engine, prompts: list[list[int]]) -> list[tuple[int, float]]:
        handles = [engine.submit(p, params) for p in prompts]
        while engine.step():
            pass
        return [(e.token_id, e.logprob.logprob) for e in _drain(handles[-1]) if e.token_id is not None]

    reused = run(Engine(model, ByteTokenizer(), config), [first, second])
    fresh = run(Engine(model, ByteTokenizer(), config), [second])
    assert [token for token, _ in reused] == [token for token, _ in fresh] == _alone(model, second)
    assert [lp for _, lp in reused] == pytest.approx([lp for _, lp in fresh], rel=1e-6, abs=1e-6)


def test_an_aborted_request_frees_its_slot_at_the_next_step():
    model = _model("M*E")
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_slots=2, max_model_len=64, prefix_cache_bytes=0))
    params = SamplingParams(max_tokens=40, temperature=0)
    kept, aborted = engine.submit([1, 2, 3], params), engine.submit([4, 5, 6, 7], params)
    engine.step()
    assert engine.scheduler.free_slots == 0
    aborted.abort()
    engine.step()
    assert engine.scheduler.free_slots == 1
    events = _drain(aborted)
    assert events[-1].finish_reason == "abort"
    while engine.step():
        pass
    assert _drain(kept)[-1].finish_reason == "length"
