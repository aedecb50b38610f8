"""The engine with experts spread over 2 and 4 real gloo ranks: rank 0 schedules, the others replay
its calls (``engine.worker.follow``); every request's greedy tokens equal the single-process model's
``generate`` on the same weights, with staggered arrivals, chunked prefill, slot moves and prefix
snapshots (restored and evicted) all exercised."""

from __future__ import annotations

import random

import pytest
import torch

from hybridlm.engine import Engine, EngineConfig, SamplingParams
from hybridlm.engine.worker import follow
from hybridlm.generation import generate
from hybridlm.tokenizer import ByteTokenizer
from tests.distributed.spawn import run_ranks
from tests.distributed.workers import load_weights, save_weights

NEW_TOKENS = 5


def _prompts() -> tuple[list[list[int]], list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(256) for _ in range(20)]
    prompts = [shared + [rng.randrange(256) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    prompts.append(list(prompts[0]))  # a repeat: restored from the prompt-end snapshot
    return prompts, [0, 0, 1, 2, 4, 4, 8]


def serving_worker(rank: int, world_size: int, weights) -> dict | int:
    from hybridlm.distributed import shard_experts

    model = shard_experts(load_weights("tiny", weights))
    if rank != 0:
        return follow(model)
    config = EngineConfig(
        max_slots=3, max_model_len=96, step_token_budget=16, prefix_cache_bytes=2**17, snapshot_interval=8
    )  # a small prefix pool: snapshots are evicted too
    engine = Engine(model, ByteTokenizer(), config, expert_group=torch.distributed.group.WORLD)
    prompts, arrivals = _prompts()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    handles, step = {}, 0
    while len(handles) < len(prompts) or engine.scheduler.has_work():
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                handles[i] = engine.submit(prompts[i], params)
        engine.step()
        step += 1
    engine.shutdown()  # tells the followers to stop
    outputs, cached = [], []
    for i in range(len(prompts)):
        events = []
        while not handles[i]._events.empty():
            events.append(handles[i]._events.get())
        outputs.append([e.token_id for e in events if e.token_id is not None])
        cached.append(events[-1].cached_tokens)
    return {"outputs": outputs, "cached": cached, "evictions": engine.prefix_cache.evictions}


@pytest.mark.parametrize("world_size", [2, 4])
def test_serving_with_experts_spread_generates_what_one_process_does(tmp_path, world_size):
    reference = save_weights("tiny", tmp_path)
    results = run_ranks(world_size, serving_worker, tmp_path)
    prompts, _ = _prompts()
    expected = [generate(reference, [p], max_new_tokens=NEW_TOKENS)[0, len(p) :].tolist() for p in prompts]
    assert results[0]["outputs"] == expected
    assert results[0]["cached"][-1] > 0 and results[0]["evictions"] > 0  # restored, and evicted, snapshots
    assert all(isinstance(replayed, int) and replayed > len(prompts) for replayed in results[1:])
