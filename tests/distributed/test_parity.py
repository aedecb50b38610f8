"""Expert parallelism on 1, 2 and 4 real gloo ranks equals one process on the same weights.

Each rank runs its own share of the batch (different prompts per rank, as data parallelism shards
it), so the splits of every all-to-all are uneven. Per world size one spawned group runs everything
(logits of a padded batch, cached decode steps, greedy generation, one training step's gradients) for
two configs; the references are the unsharded model in this process.

Tolerances, from the errors measured (fp32; 1 unit of rounding is 6e-8 relative):
- logits and decode logits: max |error| / max |logit| was 1.4e-7 over all ranks and world sizes (the
  experts' matmuls see other row counts, the decode path another kernel): rtol 1e-6 allows 7x that;
- gradients: max |error| / max |gradient| of the tensor was 2.1e-6 (with 2 or more ranks the
  replicated gradients are an all-reduce of the ranks' sums, not one process's sum; 0 with 1 rank):
  rtol 1e-5 allows 5x that.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import workers
from tests.distributed.spawn import run_ranks
from tests.helpers import assert_close

LOGITS_RTOL = 1e-6
GRADIENT_RTOL = 1e-5
WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    models = {name: workers.save_weights(name, directory) for name in workers.PARITY_CONFIGS}
    return directory, models


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def sharded_run(request, weights):
    """(world size, per-rank results of workers.parity_worker, the unsharded models)."""
    directory, models = weights
    return request.param, run_ranks(request.param, workers.parity_worker, directory), models


@pytest.mark.parametrize("config", workers.PARITY_CONFIGS)
def test_logits_equal_single_process(sharded_run, config):
    world_size, results, models = sharded_run
    for rank in range(world_size):
        expected = workers.inference_outputs(models[config], workers.rank_inputs(rank, models[config].config))
        got = results[rank][config]
        assert_close(got["logits"], expected["logits"], LOGITS_RTOL, name=f"rank {rank} logits")
        assert_close(got["decode_logits"], expected["decode_logits"], LOGITS_RTOL, name=f"rank {rank} decode logits")


@pytest.mark.parametrize("config", workers.PARITY_CONFIGS)
def test_greedy_generation_identical(sharded_run, config):
    world_size, results, models = sharded_run
    for rank in range(world_size):
        expected = workers.inference_outputs(models[config], workers.rank_inputs(rank, models[config].config))
        assert torch.equal(results[rank][config]["generated"], expected["generated"]), f"rank {rank}"


@pytest.mark.parametrize("config", workers.PARITY_CONFIGS)
def test_one_training_step_gradients_equal(sharded_run, config):
    """After average_gradients every rank holds the gradient of the mean of the ranks' losses: all of it
    for replicated parameters, its own rows for the experts (None there: no token reached them)."""
    world_size, results, models = sharded_run
    reference = models[config]
    reference.zero_grad()
    reference.train()
    losses = [
        workers.training_loss(reference, workers.rank_inputs(r, reference.config)["train_ids"])
        for r in range(world_size)
    ]
    (sum(losses) / world_size).backward()
    reference.eval()
    expected_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    for rank in range(world_size):
        grads, expert_range = results[rank][config]["grads"], results[rank][config]["expert_range"]
        assert set(grads) <= set(expected_grads), f"rank {rank}: gradients the reference lacks"
        for name, full in expected_grads.items():
            expected = full[slice(*expert_range[name])] if name in expert_range else full
            got = grads.get(name, torch.zeros_like(expected) if name in expert_range else None)
            assert got is not None, f"rank {rank}: no gradient for replicated {name}"
            assert_close(got, expected, GRADIENT_RTOL, name=f"rank {rank} {name}", scale=full.abs().max().item())


def test_every_rank_holds_its_own_expert_rows(sharded_run):
    world_size, results, models = sharded_run
    per_rank = models["tiny"].config.moe.num_experts // world_size
    for rank in range(world_size):
        ranges = set(results[rank]["tiny"]["expert_range"].values())
        assert ranges == {(rank * per_rank, (rank + 1) * per_rank)}
