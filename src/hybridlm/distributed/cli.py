"""``hybridlm rebalance DB``: capacity factors, a router bias update and an expert placement from a trace.

Registered by the main CLI through ``register(subparsers)`` (or ``add_rebalance_parser``). Importing this
module imports the ``hybridlm.distributed`` package (its ``__init__``), as any module inside it does.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import TYPE_CHECKING

from hybridlm.distributed.rebalance import DEFAULT_BIAS_RATE, DEFAULT_CAPACITY_SLACK, DEFAULT_REDUNDANT_PER_RANK

if TYPE_CHECKING:
    from hybridlm.distributed.rebalance import RebalancePlan

EPILOG = """\
examples:
  hybridlm profile debug-small --ep 4 --routing-skew 1.2 --db t.duckdb
  hybridlm rebalance t.duckdb                         # the plan per MoE block, as a table
  hybridlm rebalance t.duckdb --ep 8 --redundant-experts 2 --out plan.json

Apply a plan (Python, on every rank):
  plan = RebalancePlan.load("plan.json")
  shard_experts(model, placement=plan.placement())    # (c) hot experts replicated; outputs unchanged
  apply_capacity_factors(model, plan)                 # (a) pairs past capacity dropped
  apply_expert_bias(model, plan)                      # (b) router bias moved towards balance"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """The main CLI's hook for subcommand modules (``SUBCOMMAND_MODULES`` in hybridlm/cli.py)."""
    add_rebalance_parser(subparsers)


def add_rebalance_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    about = "per-expert capacity factors, a router bias update and a placement with hot experts replicated"
    p = subparsers.add_parser(
        "rebalance",
        help=f"{about}, from a trace",
        description=f"From the tokens per expert a trace recorded (its routing table): {about}, per MoE block. "
        "Prints the plan and the balancedness (mean / max tokens per rank) the trace had and the placement "
        "would give.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("db", metavar="DB", help="trace database (DuckDB) with a routing table")
    p.add_argument("--run", metavar="ID", help="run to read (default: the latest)")
    p.add_argument("--ep", type=int, metavar="N", help="ranks to plan for (default: the ranks that recorded the run)")
    p.add_argument(
        "--redundant-experts",
        type=int,
        default=DEFAULT_REDUNDANT_PER_RANK,
        metavar="R",
        help=f"extra expert slots per rank for copies of hot experts (default {DEFAULT_REDUNDANT_PER_RANK})",
    )
    p.add_argument(
        "--capacity-slack",
        type=float,
        default=DEFAULT_CAPACITY_SLACK,
        metavar="S",
        help=f"tokens a rank may compute, as a multiple of its even share (default {DEFAULT_CAPACITY_SLACK})",
    )
    p.add_argument(
        "--bias-rate",
        type=float,
        default=DEFAULT_BIAS_RATE,
        metavar="G",
        help=f"bias step per traced call, DeepSeek-V3's gamma (default {DEFAULT_BIAS_RATE})",
    )
    p.add_argument("--out", metavar="PLAN.json", help="write the plan as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=cmd_rebalance)
    return p


def cmd_rebalance(args: argparse.Namespace) -> int:
    from hybridlm.distributed.rebalance import plan_from_trace

    if args.ep is not None and args.ep < 1:
        raise ValueError(f"--ep {args.ep}: give 1 or more ranks")
    plan = plan_from_trace(args.db, args.ep, args.run, args.capacity_slack, args.bias_rate, args.redundant_experts)
    if args.out:
        plan.save(args.out, overwrite=args.overwrite)
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan)
        if args.out:
            print(f"plan written to {args.out}")
    return 0


def print_plan(plan: RebalancePlan) -> None:
    from hybridlm.trace.query import format_table

    slots = plan.num_experts // plan.world_size + plan.redundant_per_rank
    print(
        f"run {plan.source['run_id']} of {plan.source['db']}: {plan.num_experts} experts per MoE block on "
        f"{plan.world_size} ranks ({slots} slots each, {plan.redundant_per_rank} for copies); balancedness = "
        "mean / max tokens per rank, summed over the traced calls"
    )
    columns = ["layer", "calls", "tokens", "hottest experts", "balanced", "with copies", "copies", "capped at",
               "bias update"]  # fmt: skip
    rows = [
        (
            p.layer,
            p.num_calls,
            sum(p.tokens_per_expert),
            _hottest(p.tokens_per_expert),
            round(p.balancedness, 3),
            round(p.balancedness_with_placement, 3),
            _copies(p.physical_to_logical),
            _capped(p.capacity_factors),
            f"{min(p.expert_bias_update):+.3g}..{max(p.expert_bias_update):+.3g}",
        )
        for p in plan.layers
    ]
    print(format_table(columns, rows))


def _hottest(tokens: list[int], count: int = 3) -> str:
    total = sum(tokens) or 1
    ranked = sorted(range(len(tokens)), key=lambda e: -tokens[e])[:count]
    return ", ".join(f"e{e} {tokens[e] / total:.0%}" for e in ranked)


def _copies(physical_to_logical: list[int]) -> str:
    counts = Counter(physical_to_logical)
    return (
        " ".join(f"e{e}x{n}" for e, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n > 1) or "-"
    )


def _capped(factors: list[float | None]) -> str:
    """'e0-e3 x1.42': the experts with a capacity factor, grouped by factor (one rank's experts share one)."""
    groups: dict[float, list[int]] = {}
    for expert, factor in enumerate(factors):
        if factor is not None:
            groups.setdefault(factor, []).append(expert)
    return " ".join(f"e{ex[0]}-e{ex[-1]} x{f:.2f}" for f, ex in groups.items()) or "-"
