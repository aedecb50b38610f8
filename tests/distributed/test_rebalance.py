"""Rebalancing from a trace: the plan's arithmetic on hand tables, plans read from real DuckDB traces, and
the three fixes applied on 4 real gloo ranks.

- placement (EPLB): a hand-worked table, balancedness recomputed by hand; replicated experts leave the
  logits equal to the unreplicated sharded run and to one process, and split an expert's tokens evenly;
- capacity factors: water-filling by hand; the dispatch drops exactly the pairs a plain loop says are
  past capacity, and the output is the experts' output without them;
- bias update: the sign rule by hand; applied, the model routes as a model whose config has that bias.

Tolerance of the replicated logits: the parity tests' (test_parity.py), rtol 1e-6. Measured here: equal
bit for bit to the unreplicated sharded run (the combine adds in the same order; the copies' matmuls
see other row counts, which on debug-small's sizes moved logits by up to 7e-7 of max |logit| after
16 blocks in bench_rebalance), and at most 1.4e-7 of max |logit| from one process, as unreplicated.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm import HybridLM
from hybridlm.distributed.placement import balancedness, eplb_placement, rank_loads
from hybridlm.distributed.rebalance import (
    RebalancePlan,
    apply_expert_bias,
    capacity_factors,
    expert_bias_update,
    plan_from_trace,
    plan_layer,
)
from hybridlm.ops.moe import moe_experts_reference
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import TraceStore
from tests.distributed import workers
from tests.distributed.spawn import run_ranks
from tests.helpers import assert_close, tiny_config

WORLD_SIZE = 4
LOGITS_RTOL = 1e-6
# 8 experts on 4 ranks of 3 slots: expert 0 on every rank, expert 1 on two
HAND_PLACEMENT = [0, 1, 2, 0, 3, 4, 0, 5, 6, 0, 1, 7]
SKEWED_LOAD = [50, 30, 5, 5, 4, 3, 2, 1]


def moe_layers(name: str) -> list[int]:
    config = workers.CONFIGS[name]()
    return [i for i, char in enumerate(config.pattern) if char == "E"]


def placements(name: str) -> dict[int, list[int]]:
    first, second = moe_layers(name)
    return {first: HAND_PLACEMENT, second: eplb_placement(SKEWED_LOAD, WORLD_SIZE, redundant_per_rank=1)}


# -- the arithmetic, on tables worked by hand ----------------------------------------------------------


def test_eplb_placement_of_a_hand_table():
    """Four extra slots: expert 0 (100 tokens) gets three copies, expert 1 (50) one (ties go to the lower id);
    the copies, heaviest first, each go to the lightest rank not holding their expert."""
    load = [100, 50, 10, 10, 5, 5, 5, 5]
    placement = eplb_placement(load, world_size=4, redundant_per_rank=1)
    assert placement == [0, 1, 6, 0, 1, 7, 0, 2, 4, 0, 3, 5]
    # per rank: 25 + 25 + 5, 25 + 25 + 5, 25 + 10 + 5, 25 + 10 + 5; contiguous: 150, 20, 10, 10
    assert rank_loads(np.array([load]), placement, 4).tolist() == [[55, 55, 40, 40]]
    assert balancedness(rank_loads(np.array([load]), placement, 4)) == pytest.approx(47.5 / 55)
    assert balancedness(rank_loads(np.array([load]), list(range(8)), 4)) == pytest.approx(47.5 / 150)


def test_balancedness_sums_means_and_maxima_over_calls():
    load_TE = np.array([[4, 0, 2, 2], [1, 1, 1, 1]])  # 2 ranks of 2 experts: [4, 4] then [2, 2]
    assert balancedness(rank_loads(load_TE, [0, 1, 2, 3], 2)) == pytest.approx((4 + 2) / (4 + 2))
    load_TE = np.array([[6, 2, 0, 0], [1, 1, 1, 1]])  # [8, 0] then [2, 2]
    assert balancedness(rank_loads(load_TE, [0, 1, 2, 3], 2)) == pytest.approx((4 + 2) / (8 + 2))


def test_placement_copies_experts_at_most_once_per_rank():
    rng = np.random.default_rng(0)
    for redundant in (0, 1, 2, 4):  # 4: every rank holds every expert
        load = rng.zipf(1.5, 8).astype(float)
        placement = eplb_placement(load, 2, redundant)
        assert sorted(set(placement)) == list(range(8))
        slots = 4 + redundant
        for rank in range(2):
            held = placement[rank * slots : (rank + 1) * slots]
            assert len(held) == len(set(held)), f"redundant {redundant}: rank {rank} holds {held}"


def test_capacity_factors_cut_an_overloaded_rank_by_water_filling():
    # shares (tokens / even share 25): 2.4, 0.8 | 0.4, 0.4. Rank 0's 3.2 > 1.25 * 2 experts = 2.5: the
    # level t with min(2.4, t) + min(0.8, t) = 2.5 is 1.7. Rank 1 is under its budget: no limit.
    assert capacity_factors(np.array([60, 20, 10, 10]), world_size=2, slack=1.25) == [
        pytest.approx(1.7), pytest.approx(1.7), None, None,
    ]  # fmt: skip
    # both of rank 0's experts cut: shares 2.0, 1.6 | 0.4, 0; budget 1.0 * 2 = 2; 2.0 - 1.6 = 0.4 < 1.6,
    # so the level is 2 / 2 = 1.0
    assert capacity_factors(np.array([50, 40, 10, 0]), world_size=2, slack=1.0) == [1.0, 1.0, None, None]


def test_bias_update_replays_the_sign_rule_over_the_calls():
    load_TE = np.array([[4, 0, 2, 2], [3, 1, 2, 2], [1, 3, 2, 2]])  # mean 2 in every call
    assert expert_bias_update(load_TE, rate=0.01).tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: eplb_placement([1] * 8, 4, 7), r"--redundant-experts 7: give 0 to 6"),
        (lambda: eplb_placement([1] * 8, 3, 1), r"8 experts do not divide over 3 ranks"),
        (lambda: capacity_factors(np.ones(8), 4, slack=0), r"--capacity-slack 0: give a positive number"),
        (lambda: expert_bias_update(np.ones((1, 8)), rate=-1), r"--bias-rate -1: give a positive number"),
    ],
)
def test_bad_settings_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- plans from DuckDB traces ----------------------------------------------------------------------------


def write_trace(path: Path, routing_by_rank: dict[int, list[tuple]], ranks_with_spans: int) -> str:
    with TraceStore(path) as store:
        run_id = store.new_run(model="hand-made")
        for rows in routing_by_rank.values():
            store.add_routing(run_id, rows)
        events = [("layer", "L1.moe_dispatch", 1, "moe_dispatch", "prefill", 0, 0.0, 1.0, None, 0, rank, None, 1, None)
                  for rank in range(ranks_with_spans)]  # fmt: skip
        store.add_events(run_id, events)
        store.end_run(run_id)
    return run_id


def test_plan_from_a_trace_adds_the_ranks_rows_and_finds_the_world_size(tmp_path):
    # two steps of layer 1 (4 experts), each rank writing its own counts, as `profile --ep` does
    rank_counts = {0: [[3, 1, 0, 0], [2, 2, 0, 0]], 1: [[1, 1, 1, 1], [4, 0, 0, 0]]}
    routing = {
        rank: [(step, "decode", 1, e, n, 0) for step, counts in enumerate(steps) for e, n in enumerate(counts)]
        for rank, steps in rank_counts.items()
    }
    db = tmp_path / "t.duckdb"
    run_id = write_trace(db, routing, ranks_with_spans=2)
    plan = plan_from_trace(db, bias_rate=0.5)
    assert (plan.world_size, plan.source["run_id"], [p.layer for p in plan.layers]) == (2, run_id, [1])
    load_TE = np.array(rank_counts[0]) + np.array(rank_counts[1])  # [[4, 2, 1, 1], [6, 2, 0, 0]]
    assert plan.layers[0] == plan_layer(1, load_TE, 2, bias_rate=0.5)
    assert plan.layers[0].tokens_per_expert == [10, 4, 1, 1]
    assert plan.layers[0].balancedness == pytest.approx((4 + 4) / (6 + 8))  # ranks [6, 2] then [8, 0]


def test_rebalance_command_prints_the_plan_and_writes_it(tmp_path, capsys):
    from hybridlm.distributed.cli import add_rebalance_parser

    routing = {0: [(0, "prefill", 3, e, n, 0) for e, n in enumerate(SKEWED_LOAD)]}
    db = tmp_path / "t.duckdb"
    write_trace(db, routing, ranks_with_spans=0)
    parser = argparse.ArgumentParser()
    add_rebalance_parser(parser.add_subparsers())
    out = tmp_path / "plan.json"
    args = parser.parse_args(["rebalance", str(db), "--ep", "4", "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "e0 50%, e1 30%, e2 5%" in printed and f"plan written to {out}" in printed
    plan = RebalancePlan.load(out)
    assert plan.placement() == {3: eplb_placement(SKEWED_LOAD, 4, 1)}
    assert json.loads(out.read_text())["format"] == "hybridlm-rebalance-plan/1"
    with pytest.raises(ValueError, match=r"plan.json exists; pass --overwrite to replace it"):
        args.func(args)


def test_traces_that_cannot_be_planned_are_refused_in_one_line(tmp_path):
    db = tmp_path / "t.duckdb"
    write_trace(db, {0: [(0, "prefill", 1, e, 1, 0) for e in range(8)]}, ranks_with_spans=0)
    with pytest.raises(ValueError, match=r"not recorded with experts spread over ranks; give --ep N"):
        plan_from_trace(db)
    with TraceStore(db) as store:
        store.end_run(store.new_run(model="no moe"))
    with pytest.raises(TraceError, match=r"has no routing rows"):
        plan_from_trace(db, world_size=2)
    with pytest.raises(ValueError, match=r"not a rebalancing plan"):
        RebalancePlan.from_json('{"layers": []}')


# -- the bias, in one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("has_bias", [False, True], ids=["attached", "added"])
def test_bias_update_routes_as_a_model_whose_config_has_that_bias(has_bias):
    """Applied to a router without an expert bias, the update is attached as one; the independent truth is a
    model built with use_expert_bias whose bias parameter holds the update (and, with a bias, old + update)."""
    torch.manual_seed(0)
    model = HybridLM(tiny_config("ME*E", moe={"use_expert_bias": has_bias})).eval()
    before = HybridLM(tiny_config("ME*E", moe={"use_expert_bias": has_bias})).eval()
    before.load_state_dict(model.state_dict())
    reference = HybridLM(tiny_config("ME*E", moe={"use_expert_bias": True})).eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    update = {1: [0.3, -0.2, 0, 0, 0.1, 0, 0, -0.05], 3: [-0.1, 0, 0.2, 0, 0, 0, 0, 0]}
    for index, values in update.items():
        old = model.layers[index].mixer.gate.e_score_correction_bias
        truth = torch.tensor(values) + (0 if old is None else old.detach())
        reference.layers[index].mixer.gate.e_score_correction_bias.data = truth
    layers = [plan_layer(index, np.ones((1, 8)), 1, redundant_per_rank=0) for index in update]
    for layer_plan in layers:
        layer_plan.expert_bias_update = update[layer_plan.layer]
    how = apply_expert_bias(model, RebalancePlan(1, 8, 1.25, 1e-3, 0, layers=layers))
    assert how == ("added to e_score_correction_bias" if has_bias else "attached as e_score_correction_bias")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        assert not torch.equal(model(ids).logits, before(ids).logits), "the bias changed no routing"


# -- the fixes on 4 gloo ranks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rebalance")
    models = {name: workers.save_weights(name, directory) for name in workers.PARITY_CONFIGS}
    store_path = directory / "trace.duckdb"
    return run_ranks(WORLD_SIZE, rebalance_worker, directory, store_path), models, store_path


@pytest.mark.parametrize("config", workers.PARITY_CONFIGS)
def test_replicated_experts_leave_outputs_identical(ranks, config):
    """Logits of a padded batch and of cached decode steps equal the unreplicated sharded run's and one
    process's; greedy tokens are identical."""
    results, models, _ = ranks
    for rank in range(WORLD_SIZE):
        got = results[rank][config]
        single = workers.inference_outputs(models[config], workers.rank_inputs(rank, models[config].config))
        for key in ("logits", "decode_logits"):
            for truth, name in ((got["contiguous"], "unreplicated"), (single, "single process")):
                assert_close(got["replicated"][key], truth[key], LOGITS_RTOL, name=f"rank {rank} {key} vs {name}")
        assert torch.equal(got["replicated"]["generated"], single["generated"]), f"rank {rank}"


def test_each_rank_holds_the_slots_of_the_placement(ranks):
    results, _, _ = ranks
    first, second = moe_layers("tiny")
    for rank in range(WORLD_SIZE):
        held = results[rank]["tiny"]["local_experts"]
        assert held[first] == HAND_PLACEMENT[3 * rank : 3 * rank + 3]
        assert held[second] == placements("tiny")[second][3 * rank : 3 * rank + 3]


def test_an_expert_with_a_copy_on_every_rank_splits_its_tokens_evenly(ranks):
    """Every rank sends its 6 pairs to expert 0, which has a copy on each of the 4 ranks: each rank computes
    24 / 4 = 6 of them, and every rank's output is the expert's output."""
    results, _, _ = ranks
    for rank in range(WORLD_SIZE):
        split = results[rank]["split"]
        assert split["computed"] == 6, f"rank {rank} computed {split['computed']} pairs"
        x_ND, ids_NK, weights_NK = split_inputs(rank)
        experts = workers.edge_experts()
        expected = moe_experts_reference(x_ND, ids_NK, weights_NK, experts.gate_up_proj, experts.down_proj, "swiglu")
        assert_close(split["out"], expected, name=f"rank {rank} output")


def test_capacity_drops_the_pairs_past_it_in_token_order(ranks):
    results, _, _ = ranks
    for rank in range(WORLD_SIZE):
        got = results[rank]["capacity"]
        x_ND, ids_NK, weights_NK = capacity_inputs(rank)
        dropped_NK = torch.zeros_like(ids_NK, dtype=torch.bool)
        seen = [0] * 8
        limit = [f * ids_NK.numel() / 8 for f in CAPACITY_FACTORS]  # a pair is kept while seen < limit
        for n in range(ids_NK.shape[0]):
            for k in range(ids_NK.shape[1]):
                expert = int(ids_NK[n, k])
                dropped_NK[n, k] = seen[expert] >= limit[expert]
                seen[expert] += 1
        assert torch.equal(got["dropped_pairs"], dropped_NK), f"rank {rank}"
        assert got["dropped_per_expert"].tolist() == [int(dropped_NK[ids_NK == e].sum()) for e in range(8)]
        assert dropped_NK.any(), "the case drops nothing"
        experts = workers.edge_experts()
        kept_weights = weights_NK.masked_fill(dropped_NK, 0)
        expected = moe_experts_reference(x_ND, ids_NK, kept_weights, experts.gate_up_proj, experts.down_proj, "swiglu")
        assert_close(got["out"], expected, name=f"rank {rank} output")


def test_a_plans_capacity_factors_reach_every_block(ranks):
    """Each block holds the plan's factors (inf for no limit); the forward drops only the capped experts'
    pairs, never more than were routed; a plan for another world size is refused."""
    results, _, _ = ranks
    plan = skewed_plan(WORLD_SIZE)
    dropped_anything = False
    for rank in range(WORLD_SIZE):
        got = results[rank]["model_capacity"]
        for layer_plan in plan.layers:
            block = got[layer_plan.layer]
            factors = [math.inf if f is None else f for f in layer_plan.capacity_factors]
            assert block["factors"].tolist() == pytest.approx(factors)
            assert (block["dropped"] <= block["routed"]).all()
            assert all(block["dropped"][e] == 0 for e, f in enumerate(layer_plan.capacity_factors) if f is None)
            dropped_anything |= bool(block["dropped"].sum())
        assert got["other_world_size"] == (
            "the plan's capacity factors are for 2 ranks, the experts are sharded over 4; plan again with --ep 4"
        )
    assert dropped_anything, "the skewed plan dropped nothing"


def test_a_plan_from_the_ranks_trace_counts_every_ranks_tokens(ranks):
    """Rank 0 wrote every rank's spans and routing rows into a DuckDB file; the plan read from it sums the
    tokens each rank's MoE blocks routed (kept by each rank in memory)."""
    results, _, store_path = ranks
    plan = plan_from_trace(store_path)
    assert plan.world_size == WORLD_SIZE
    for layer_plan in plan.layers:
        routed = sum(
            counts
            for rank in range(WORLD_SIZE)
            for layer, counts in results[rank]["routing"]
            if layer == layer_plan.layer
        )
        assert layer_plan.tokens_per_expert == routed.tolist()
        assert layer_plan.num_calls == 2


def test_refusals(ranks):
    results, _, _ = ranks
    assert results[0]["refusals"] == {
        "training": "layer 1: replicated experts are for inference (the copies' gradients are not summed); shard "
        "without a placement to train",
        "length": "the placement of layer 1 lists 9 physical slots: it needs the same number (at least 1) on each "
        "of the 4 ranks",
        "missing": "the placement of layer 1 holds no copy of expert 7: every expert needs at least one slot",
        "layer": "the placement names layer 2, which is not a MoE block; the MoE blocks are layers [1, 3]",
    }


# -- what the ranks run -------------------------------------------------------------------------------------

CAPACITY_FACTORS = [0.5, 1.0, math.inf, math.inf, math.inf, math.inf, math.inf, 0.25]


def split_inputs(rank: int):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(6, 64, generator=g), torch.zeros(6, 1, dtype=torch.int64), torch.rand(6, 1, generator=g)


def capacity_inputs(rank: int):
    """12 tokens, top-2 of 8 experts drawn towards experts 0 and 1."""
    g = torch.Generator().manual_seed(100 + rank)
    weights_E = torch.tensor([8.0, 6, 1, 1, 1, 1, 1, 3])
    ids_NK = torch.stack([torch.multinomial(weights_E, 2, generator=g) for _ in range(12)])
    return torch.randn(12, 64, generator=g), ids_NK, torch.rand(12, 2, generator=g)


def rebalance_worker(rank: int, world_size: int, directory: Path, store_path: Path) -> dict:
    from hybridlm.distributed import ShardedExperts, shard_experts, sharded_experts

    results: dict = {}
    for name in workers.PARITY_CONFIGS:
        inputs = workers.rank_inputs(rank, workers.CONFIGS[name]())
        contiguous = shard_experts(workers.load_weights(name, directory))
        replicated = shard_experts(workers.load_weights(name, directory), placement=placements(name))
        results[name] = {
            "contiguous": workers.inference_outputs(contiguous, inputs),
            "replicated": workers.inference_outputs(replicated, inputs),
            "local_experts": {e.layer_index: e.local_experts for e in sharded_experts(replicated)},
        }

    everywhere = ShardedExperts(workers.edge_experts(), 0, physical_to_logical=HAND_PLACEMENT)
    computed = []
    everywhere.on_span = lambda layer, kind, *span: computed.append(sum(span[-1])) if kind == "moe_experts" else None
    with torch.no_grad():
        results["split"] = {"out": everywhere(*split_inputs(rank)), "computed": computed[0]}

    capped = ShardedExperts(workers.edge_experts(), 0)
    capped.capacity_factors = torch.tensor(CAPACITY_FACTORS)
    with torch.no_grad():
        out = capped(*capacity_inputs(rank))
    results["capacity"] = {
        "out": out,
        "dropped_pairs": capped.last_dropped_pairs_NK,
        "dropped_per_expert": capped.last_dropped_per_expert,
    }
    results["model_capacity"] = model_with_capacity(rank)
    results["routing"] = traced_run(rank, store_path)
    results["refusals"] = refusal_messages()
    return results


def skewed_plan(world_size: int) -> RebalancePlan:
    """A plan for "ME*E" from a hand-made skewed load (expert 0 and 1 hot)."""
    load_TE = np.array([SKEWED_LOAD, SKEWED_LOAD[::-1]])
    layers = [plan_layer(index, load_TE, world_size) for index in (1, 3)]
    return RebalancePlan(world_size, 8, 1.25, 1e-3, 1, layers=layers)


def model_with_capacity(rank: int) -> dict:
    """The plan's capacity factors applied to a sharded model: what each block holds and drops in a forward."""
    from hybridlm.distributed import shard_experts, sharded_experts
    from hybridlm.distributed.rebalance import apply_capacity_factors

    torch.manual_seed(0)
    model = shard_experts(HybridLM(tiny_config("ME*E")).eval())
    apply_capacity_factors(model, skewed_plan(WORLD_SIZE))
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(rank)))
    blocks = {block.index: block.mixer for block in model.layers if block.routes_experts}
    result = {
        e.layer_index: {
            "factors": e.capacity_factors,
            "dropped": e.last_dropped_per_expert,
            "routed": blocks[e.layer_index].last_tokens_per_expert,
        }
        for e in sharded_experts(model)
    }
    try:
        apply_capacity_factors(model, skewed_plan(2))
    except ValueError as error:
        result["other_world_size"] = str(error)
    return result


def traced_run(rank: int, store_path: Path) -> list:
    """Two traced forwards of the contiguous tiny model; rank 0 writes every rank's spans and routing rows.
    Returns this rank's tokens per expert of each MoE call: [(layer, counts [E])]."""
    import torch.distributed as dist

    from hybridlm.distributed import CollectiveTrace, shard_experts

    torch.manual_seed(0)
    model = shard_experts(HybridLM(tiny_config("ME*E")).eval())
    trace = CollectiveTrace(rank=rank, phase="prefill").attach(model)
    log = model.block_observer = workers.RoutingLog()
    with torch.no_grad():
        for step in range(2):
            model(torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(10 * rank + step)))
    routing = [(step, "prefill", layer, e, int(n), 0)
               for step, pair in enumerate(zip(log.calls[::2], log.calls[1::2], strict=True))
               for layer, counts in pair for e, n in enumerate(counts)]  # fmt: skip
    rows, all_routing = trace.gather_rows(), [None] * dist.get_world_size()
    dist.all_gather_object(all_routing, routing)
    if rank == 0:
        with TraceStore(store_path) as store:
            run_id = store.new_run(model="debug-tiny ME*E")
            store.add_events(run_id, rows)
            for rank_routing in all_routing:
                store.add_routing(run_id, rank_routing)
            store.end_run(run_id)
    return log.calls


def refusal_messages() -> dict[str, str]:
    from hybridlm.distributed import shard_experts

    def message(call) -> str:
        try:
            call()
        except ValueError as error:
            return str(error)
        return "no error"

    def train_replicated():
        model = shard_experts(HybridLM(tiny_config("ME*E")), placement={1: HAND_PLACEMENT}).train()
        model(torch.zeros(1, 3, dtype=torch.int64))

    def shard(placement):
        return lambda: shard_experts(HybridLM(tiny_config("ME*E")), placement=placement)

    return {
        "training": message(train_replicated),
        "length": message(shard({1: [*range(8), 0]})),
        "missing": message(shard({1: [0, 1, 2, 3, 4, 5, 6, 0]})),
        "layer": message(shard({2: HAND_PLACEMENT})),
    }
