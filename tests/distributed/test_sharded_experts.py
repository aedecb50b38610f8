"""ShardedExperts alone on routings that leave ranks idle, and shard_experts' refusals."""

from __future__ import annotations

import pytest
import torch

from hybridlm.ops.moe import moe_experts_grouped
from tests.distributed import workers
from tests.distributed.spawn import run_ranks
from tests.helpers import assert_close, tiny_config

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def edge_results():
    return run_ranks(WORLD_SIZE, workers.edge_worker)


def _expected(rank: int, case: str):
    """The unsharded experts on this rank's tokens: output and gradients."""
    experts = workers.edge_experts()
    x_ND, ids_NK, weights_NK = workers.edge_inputs(rank, WORLD_SIZE, case)
    x_ND.requires_grad_(True)
    weights_NK.requires_grad_(True)
    out_ND = moe_experts_grouped(x_ND, ids_NK, weights_NK, experts.gate_up_proj, experts.down_proj, "swiglu")
    return experts, x_ND, weights_NK, out_ND


def _grad(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded experts leave no gradient on a rank without tokens; the sharded ones an empty one."""
    return tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)


@pytest.mark.parametrize("case", ["one_rank", "to_last"])
def test_idle_ranks_join_every_collective_and_values_agree(edge_results, case):
    """Ranks with no tokens, or that receive none, still take part forward and backward (else the
    others would wait forever); each rank's output and input gradients equal the unsharded experts'."""
    for rank in range(WORLD_SIZE):
        _, x_ND, weights_NK, out_ND = _expected(rank, case)
        (out_ND * out_ND.detach().sign()).sum().backward()
        got = edge_results[rank][case]
        assert_close(got["out"], out_ND.detach(), name=f"rank {rank} output")
        assert_close(got["x_grad"], _grad(x_ND), name=f"rank {rank} input gradient")
        assert_close(got["weights_grad"], _grad(weights_NK), name=f"rank {rank} routing weight gradient")


@pytest.mark.parametrize("case", ["one_rank", "to_last"])
def test_expert_gradients_sum_every_ranks_tokens(edge_results, case):
    """A rank's expert rows get the gradients of every rank's tokens routed to them (summed by the
    all-to-all's backward); rows no token reached get none."""
    grads = {}
    for rank in range(WORLD_SIZE):
        experts, _, _, out_ND = _expected(rank, case)
        (out_ND * out_ND.detach().sign()).sum().backward()
        for name, param in experts.named_parameters():
            grads[name] = grads.get(name, 0) + _grad(param)
    for rank in range(WORLD_SIZE):
        got = edge_results[rank][case]
        rows = slice(got["first_expert"], got["first_expert"] + 8 // WORLD_SIZE)
        for name, full in grads.items():
            local = got[name] if got[name] is not None else torch.zeros_like(full[rows])
            assert_close(local, full[rows], name=f"rank {rank} {name}", scale=full.abs().max().item())


def test_refusals_are_one_clear_line():
    messages = run_ranks(WORLD_SIZE, workers.refusals_worker)[0]
    assert messages["not_dividing"] == (
        "3 experts per MoE block do not divide over 2 ranks: every rank must hold the same number; "
        "use a world size that divides 3"
    )
    assert messages["rank_without_experts"] == (
        "2 ranks for 1 experts per MoE block: a rank would hold no experts; use at most 1 ranks"
    )
    assert messages["no_moe_blocks"] == "the model has no MoE blocks (pattern 'M*-'): there are no experts to shard"
    assert messages["already_sharded"] == "the model's experts are already sharded"


def test_refused_without_a_process_group():
    from hybridlm import HybridLM
    from hybridlm.distributed import shard_experts

    with pytest.raises(
        ValueError, match=r"torch\.distributed is not initialised: call torch\.distributed\.init_process_group first"
    ):
        shard_experts(HybridLM(tiny_config("ME")))
