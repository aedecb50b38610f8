"""The engine as a service: its thread, blocking and asyncio streams, the queue bound, shutdown, the pool plan."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hybridlm.accounting import cache_bytes
from hybridlm.engine import Engine, EngineConfig, EngineStopped, QueueFull, RequestError, SamplingParams
from hybridlm.generation import generate
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer
from tests.helpers import tiny_config

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(tiny_config("MEG*E")).eval()


def _engine(model, **settings) -> Engine:
    return Engine(model, ByteTokenizer(), EngineConfig(**{"max_model_len": 64, "prefix_cache_bytes": 0, **settings}))


def test_the_engine_thread_serves_blocking_and_asyncio_clients(model):
    engine = _engine(model, max_slots=2).start()
    try:
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
        blocking = [engine.generate(p, GREEDY) for p in prompts]

        async def stream_all():
            handles = [engine.submit(p, GREEDY) for p in prompts]
            return await asyncio.gather(*[_collect(h) for h in handles])

        streamed = asyncio.run(stream_all())
        expected = [generate(model, [p], max_new_tokens=5)[0, len(p) :].tolist() for p in prompts]
        assert blocking == expected == [[e.token_id for e in events if e.token_id is not None] for events in streamed]
        assert all(events[-1].finish_reason == "length" for events in streamed)
    finally:
        engine.shutdown()
    assert engine.stats()["running"] == 0 and engine.stats()["free_slots"] == 2


async def _collect(handle):
    return [event async for event in handle.stream()]


def test_past_the_queue_bound_a_request_is_refused_and_after_shutdown_too(model):
    engine = _engine(model, max_slots=1, max_waiting=1)
    engine.submit([1, 2], GREEDY)
    engine.submit([3, 4], GREEDY)  # one waits beyond the free slot
    with pytest.raises(QueueFull, match="max-waiting 1"):
        engine.submit([5, 6], GREEDY)
    engine.shutdown(drain=False)
    with pytest.raises(EngineStopped):
        engine.submit([7], GREEDY)


def test_shutdown_without_drain_aborts_running_requests_and_with_drain_finishes_them(model):
    engine = _engine(model, max_slots=2).start()
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    handles = [engine.submit([1, 2, 3], long), engine.submit([4], long)]
    engine.shutdown(drain=False)
    assert [list(h)[-1].finish_reason for h in handles] == ["abort", "abort"]

    engine = _engine(model, max_slots=2).start()
    handles = [engine.submit([1, 2, 3], GREEDY), engine.submit([4], GREEDY)]
    engine.shutdown(drain=True)
    assert [list(h)[-1].finish_reason for h in handles] == ["length", "length"]


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "param"),
    [([], 5, "prompt"), ([1] * 64, 1, "prompt"), ([1] * 60, 5, "max_tokens"), ([1, 999], 5, "prompt")],
)
def test_a_request_that_cannot_run_is_refused_naming_the_field(model, prompt, max_tokens, param):
    engine = _engine(model)
    with pytest.raises(RequestError) as error:
        engine.submit(prompt, SamplingParams(max_tokens=max_tokens))
    assert error.value.param == param


def test_the_pool_is_clamped_to_the_budget_with_a_message(model):
    per_slot = cache_bytes(model.config, 1, 64, model.dtype).total
    engine = _engine(model, max_slots=8, memory_budget_bytes=3 * per_slot + 1)
    report = engine.memory_report()
    assert report["slots"] == 3 and engine.cache.batch_size == 3
    assert "--max-slots 8 clamped to 3" in report["message"]
    assert report["kv"] + report["conv"] + report["recurrent"] == engine.cache.nbytes() == 3 * per_slot
    with pytest.raises(ValueError, match=r"--max-model-len 64 .* --memory-budget"):
        _engine(model, memory_budget_bytes=per_slot - 1)
