"""Fix expert imbalance from a stored trace: capacity factors, a router bias update, a placement.

Legend: E experts per MoE block, W ranks, L = E / W experts per rank, T MoE calls of a block in the trace.

``plan_from_trace(db, world_size)`` reads the ``routing`` table (tokens per (step, phase, layer,
expert), summed over whatever ranks wrote rows) and computes, for every MoE block:

(a) ``capacity_factors`` [E]: for the contiguous sharding, a rank whose experts get more than
    ``capacity_slack`` times its even share (L / E of the tokens) is capped by water-filling: its
    experts' shares (tokens / (total / E), 1.0 = even) are cut at the level t where the rank's capped
    shares add up to slack * L, and each of its experts gets factor t; experts of other ranks get None
    (no limit). ``ShardedExperts`` then sends expert e at most ceil(t * M / E) of a rank's M pairs per
    call and drops the rest (``apply_capacity_factors``);
(b) ``expert_bias_update`` [E]: DeepSeek-V3's aux-loss-free rule (technical report, section 2.1.2),
    bias[e] += rate * sign(mean load - load[e]), iterated once per traced call of the block, on the
    loads observed in that call (a replay: the trace cannot show how the load would have answered the
    bias, so the sum is rate * (calls below the mean - calls above it), and a large rate overshoots).
    The loop closes across runs: a trace recorded with the bias applied plans the next increment, which
    adds to it (bench_rebalance runs three such rounds). ``apply_expert_bias`` adds it
    to the router's ``e_score_correction_bias``; a router without one (``use_expert_bias`` false) gets
    it attached as one, which ``route`` then applies the same way: to choose the top-k only, the
    combine weights still come from the unbiased scores;
(c) ``physical_to_logical``: an EPLB placement with ``redundant_per_rank`` extra slots per rank
    (``placement.eplb_placement``), passed to ``shard_experts(model, placement=plan.placement())``.

Each plan row also gives the balancedness the trace had and the one the placement would give on the
same calls (``placement.balancedness``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hybridlm.distributed.placement import (
    balancedness,
    check_placement_size,
    contiguous_placement,
    eplb_placement,
    rank_loads,
)

PLAN_FORMAT = "hybridlm-rebalance-plan/1"
DEFAULT_CAPACITY_SLACK = 1.25
DEFAULT_BIAS_RATE = 1e-3  # DeepSeek-V3's gamma
DEFAULT_REDUNDANT_PER_RANK = 1


@dataclass
class LayerPlan:
    """One MoE block's plan; lists are per expert (E) or per physical slot (W * S)."""

    layer: int
    tokens_per_expert: list[int]
    num_calls: int
    balancedness: float  # in the trace, with the contiguous sharding
    balancedness_with_placement: float  # the same calls, with physical_to_logical
    capacity_factors: list[float | None]
    expert_bias_update: list[float]
    physical_to_logical: list[int]


@dataclass
class RebalancePlan:
    world_size: int
    num_experts: int
    capacity_slack: float
    bias_rate: float
    redundant_per_rank: int
    source: dict = field(default_factory=dict)  # db, run_id: where the loads came from
    layers: list[LayerPlan] = field(default_factory=list)

    def placement(self) -> dict[int, list[int]]:
        """{layer: physical_to_logical}, what ``shard_experts(..., placement=)`` takes."""
        return {p.layer: p.physical_to_logical for p in self.layers}

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, name: str = "plan") -> RebalancePlan:
        try:
            data = json.loads(text)
            if data.pop("format", None) != PLAN_FORMAT:
                raise ValueError(f"not a {PLAN_FORMAT} file")
            layers = [LayerPlan(**layer) for layer in data.pop("layers")]
            return cls(**data, layers=layers)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{name}: not a rebalancing plan written by `hybridlm rebalance` ({error})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> RebalancePlan:
        return cls.from_json(Path(path).read_text(), name=str(path))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the JSON beside ``path`` first, then move it into place (never half a file); an existing
        file is replaced only with ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
        if path.is_dir():
            raise ValueError(f"{path} is a directory; give a file name for the plan")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            f.write(self.to_json() + "\n")
        os.replace(f.name, path)


# -- reading the trace ---------------------------------------------------------------------------


def read_expert_loads(db: str | os.PathLike, run_id: str | None = None) -> tuple[str, dict[int, np.ndarray]]:
    """(run id, {layer: [T, E] tokens per expert per call}) from the ``routing`` table of trace ``db``
    (the latest run when ``run_id`` is None). Rows of one (step, phase) from several ranks are added."""
    from hybridlm.trace.analysis import resolve_run
    from hybridlm.trace.schema import TraceError
    from hybridlm.trace.store import open_readonly

    con = open_readonly(db)
    try:
        run_id = resolve_run(con, run_id)
        rows = con.execute(
            "SELECT layer, step, phase, expert, sum(tokens) FROM routing WHERE run_id = ? "
            "GROUP BY ALL ORDER BY layer, step, phase, expert",
            [run_id],
        ).fetchall()
    finally:
        con.close()
    if not rows:
        raise TraceError(
            f"{db}: run {run_id} has no routing rows (tokens per expert): trace a model with MoE blocks, "
            "e.g. `hybridlm profile MODEL --db DB`"
        )
    num_experts = max(expert for _, _, _, expert, _ in rows) + 1
    calls: dict[int, dict[tuple, np.ndarray]] = {}
    for layer, step, phase, expert, tokens in rows:
        call = calls.setdefault(layer, {}).setdefault((step, phase), np.zeros(num_experts, dtype=np.int64))
        call[expert] = tokens
    return run_id, {layer: np.stack(list(by_call.values())) for layer, by_call in calls.items()}


def world_size_of(db: str | os.PathLike, run_id: str) -> int | None:
    """How many ranks recorded the run's expert-parallel spans (None when it has none)."""
    from hybridlm.trace.store import open_readonly

    con = open_readonly(db)
    try:
        [(ranks,)] = con.execute(
            "SELECT count(DISTINCT rank) FROM events WHERE run_id = ? AND layer_type = 'moe_dispatch'", [run_id]
        ).fetchall()
    finally:
        con.close()
    return ranks or None


# -- the three fixes ------------------------------------------------------------------------------


def capacity_factors(load_E: np.ndarray, world_size: int, slack: float = DEFAULT_CAPACITY_SLACK) -> list[float | None]:
    """(a) of the module docstring: factor t for every expert of a rank over its budget, else None."""
    if slack <= 0:
        raise ValueError(f"--capacity-slack {slack}: give a positive number (1.0 = each rank its even share)")
    load_E = np.asarray(load_E, dtype=np.float64)
    num_experts = len(load_E)
    per_rank = num_experts // world_size
    total = load_E.sum()
    share_E = load_E * num_experts / total if total > 0 else np.zeros(num_experts)
    factors: list[float | None] = [None] * num_experts
    for rank in range(world_size):
        experts = range(rank * per_rank, (rank + 1) * per_rank)
        level = water_level(share_E[experts.start : experts.stop], slack * per_rank)
        if level is not None:
            for e in experts:
                factors[e] = level
    return factors


def water_level(shares: np.ndarray, budget: float) -> float | None:
    """The t with sum(min(shares, t)) == budget, or None when sum(shares) <= budget (nothing to cut)."""
    if shares.sum() <= budget:
        return None
    descending = np.sort(shares)[::-1]
    uncut = descending.sum()
    for k in range(1, len(descending) + 1):  # the k largest are cut to t
        uncut -= descending[k - 1]
        level = (budget - uncut) / k
        if k == len(descending) or level >= descending[k]:
            return float(level)
    raise AssertionError("unreachable: k == len(shares) returns")


def expert_bias_update(load_TE: np.ndarray, rate: float = DEFAULT_BIAS_RATE) -> np.ndarray:
    """(b) of the module docstring: [E], rate * sum over calls of sign(mean load - load)."""
    if not rate > 0:
        raise ValueError(f"--bias-rate {rate}: give a positive number (DeepSeek-V3 used 0.001 per step)")
    load_TE = np.atleast_2d(np.asarray(load_TE, dtype=np.float64))
    return rate * np.sign(load_TE.mean(axis=1, keepdims=True) - load_TE).sum(axis=0)


def plan_layer(
    layer: int,
    load_TE: np.ndarray,
    world_size: int,
    capacity_slack: float = DEFAULT_CAPACITY_SLACK,
    bias_rate: float = DEFAULT_BIAS_RATE,
    redundant_per_rank: int = DEFAULT_REDUNDANT_PER_RANK,
) -> LayerPlan:
    load_E = load_TE.sum(axis=0)
    placement = eplb_placement(load_E, world_size, redundant_per_rank)
    return LayerPlan(
        layer=layer,
        tokens_per_expert=[int(t) for t in load_E],
        num_calls=len(load_TE),
        balancedness=balancedness(rank_loads(load_TE, contiguous_placement(len(load_E)), world_size)),
        balancedness_with_placement=balancedness(rank_loads(load_TE, placement, world_size)),
        capacity_factors=capacity_factors(load_E, world_size, capacity_slack),
        expert_bias_update=[float(b) for b in expert_bias_update(load_TE, bias_rate)],
        physical_to_logical=placement,
    )


def plan_from_trace(
    db: str | os.PathLike,
    world_size: int | None = None,
    run_id: str | None = None,
    capacity_slack: float = DEFAULT_CAPACITY_SLACK,
    bias_rate: float = DEFAULT_BIAS_RATE,
    redundant_per_rank: int = DEFAULT_REDUNDANT_PER_RANK,
) -> RebalancePlan:
    """The plan for every MoE block of trace ``db``'s run (the latest by default) on ``world_size`` ranks
    (default: as many as recorded the run's all-to-all spans)."""
    run_id, loads = read_expert_loads(db, run_id)
    if world_size is None:
        world_size = world_size_of(db, run_id)
        if world_size is None:
            raise ValueError(f"{db}: run {run_id} was not recorded with experts spread over ranks; give --ep N")
    num_experts = next(iter(loads.values())).shape[1]
    check_placement_size(num_experts, world_size, redundant_per_rank)
    layers = [
        plan_layer(layer, load_TE, world_size, capacity_slack, bias_rate, redundant_per_rank)
        for layer, load_TE in sorted(loads.items())
    ]
    source = {"db": str(db), "run_id": run_id}
    return RebalancePlan(world_size, num_experts, capacity_slack, bias_rate, redundant_per_rank, source, layers)


# -- applying a plan to a model ---------------------------------------------------------------------


def _moe_blocks_of_plan(model: nn.Module, plan: RebalancePlan) -> list[tuple[nn.Module, LayerPlan]]:
    blocks = {block.index: block for block in model.layers if block.routes_experts}
    missing = [p.layer for p in plan.layers if p.layer not in blocks]
    if missing:
        raise ValueError(f"the plan is for MoE blocks at layers {missing}, which this model does not have there")
    experts = {len(blocks[p.layer].mixer.gate.weight) for p in plan.layers}
    if experts != {plan.num_experts}:
        raise ValueError(f"the plan is for {plan.num_experts} experts per MoE block, the model has {experts.pop()}")
    return [(blocks[p.layer], p) for p in plan.layers]


def apply_capacity_factors(model: nn.Module, plan: RebalancePlan) -> None:
    """Set each sharded MoE block's ``capacity_factors`` from the plan (None in the plan: no limit)."""
    from hybridlm.distributed.experts import ShardedExperts

    for block, layer_plan in _moe_blocks_of_plan(model, plan):
        experts = block.mixer.experts
        if not isinstance(experts, ShardedExperts):
            raise ValueError("capacity factors limit the dispatch of sharded experts: call shard_experts first")
        if experts.world_size != plan.world_size:
            raise ValueError(
                f"the plan's capacity factors are for {plan.world_size} ranks, the experts are sharded over "
                f"{experts.world_size}; plan again with --ep {experts.world_size}"
            )
        factors = [math.inf if f is None else f for f in layer_plan.capacity_factors]
        experts.capacity_factors = torch.tensor(factors, dtype=torch.float64)


@torch.no_grad()
def apply_expert_bias(model: nn.Module, plan: RebalancePlan) -> str:
    """Add each MoE block's bias update to its router's expert bias; returns how: "added to
    e_score_correction_bias", or "attached as e_score_correction_bias" for routers that had none (the
    model's config does not say use_expert_bias then: a saved checkpoint carries the extra tensors)."""
    how = "added to e_score_correction_bias"
    for block, layer_plan in _moe_blocks_of_plan(model, plan):
        router = block.mixer.gate
        update = torch.tensor(layer_plan.expert_bias_update, dtype=torch.float32, device=router.weight.device)
        if router.e_score_correction_bias is None:
            router.e_score_correction_bias = nn.Parameter(update, requires_grad=False)
            how = "attached as e_score_correction_bias"
        else:
            router.e_score_correction_bias += update.to(router.e_score_correction_bias.dtype)
    return how
