"""The expert-parallel part of a report: the MoE blocks' parts per rank, tokens per rank, and the straggler.

A run whose experts were spread over ranks (``hybridlm profile --ep N``, hybridlm.distributed) holds,
per MoE block call and rank, the block's parts (``moe_router``, ``moe_dispatch``, ``moe_experts``,
``moe_combine``; source 'layer', with the rank) and, for the two all-to-alls, a 'collective' row that
starts when the rank entered the collective, on a clock every rank shares. Here:

- ``rank_decomposition``: p50 / p99 / tail of each part per rank and phase (the other layer types stay
  pooled over the ranks, in ``analysis.decomposition``: they do the same work on every rank);
- ``rank_tokens``: (token, expert) pairs each rank sent and its experts computed;
- ``stragglers``: per collective and phase, per (step, layer) the rank that entered last, which the
  others waited for (wait = last entry - own entry): which rank is last most often, the waits, and the
  experts hot on that rank in the calls where it was last (from the routing counts).

Experts are placed as ``shard_experts`` places them, E / W contiguous experts per rank, unless the
run's notes give a placement (``placement``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb

from hybridlm.trace.analysis import ALL_PHASES, phase_key, type_key
from hybridlm.trace.schema import EXPERT_PARALLEL_LAYER_TYPES

COLLECTIVES = ("moe_dispatch", "moe_combine")


@dataclass(frozen=True)
class RankRow:
    """One part of the expert-parallel MoE blocks on one rank, in one phase (or ALL_PHASES)."""

    layer_type: str  # moe_router / moe_dispatch / moe_experts / moe_combine
    phase: str
    rank: int
    calls: int
    p50_us: float
    p99_us: float
    mean_us: float
    tail_ratio: float | None
    tokens: int  # (token, expert) pairs: routed (router), sent (dispatch, combine), computed (experts)


@dataclass(frozen=True)
class RankTokens:
    """What one rank's MoE blocks moved in one phase: pairs its dispatches sent (to every rank, itself
    included) and pairs its experts computed (received from every rank)."""

    phase: str
    rank: int
    sent: int
    received: int
    load: float | None  # received / mean received over the ranks (1.0 = even)


@dataclass(frozen=True)
class Straggler:
    """Who the ranks waited for in one collective (moe_dispatch or moe_combine) of one phase.

    Per (step, layer) the rank that entered last is the straggler; each other rank waited
    max entry - its own entry. ``hot_experts``: on the rank most often last, its experts' tokens in
    the calls where it was last, as (layer, expert, tokens / mean tokens per expert of that layer).
    """

    layer_type: str
    phase: str
    calls: int  # (step, layer) collectives every rank entered
    last_counts: dict[int, int]  # rank -> calls in which it entered last
    rank: int  # the rank most often last
    wait_p50_us: float | None  # waits of the other ranks, over every call
    wait_p99_us: float | None
    wait_max_us: float | None
    hot_experts: tuple[tuple[int, int, float], ...]

    @property
    def share(self) -> float:
        """How often ``rank`` was last."""
        return self.last_counts.get(self.rank, 0) / self.calls if self.calls else 0.0


def _with_all_phases(sql: str) -> str:
    """``sql`` over its rows with a phase, then again over all of them as phase ALL_PHASES."""
    return f"SELECT * FROM ({sql.format(phase='phase', where='AND phase IS NOT NULL')}) UNION ALL " + (
        f"SELECT * FROM ({sql.format(phase='$all_phases', where='')})"
    )


def rank_decomposition(con: duckdb.DuckDBPyConnection, run_id: str) -> list[RankRow]:
    """Per phase (then ALL_PHASES), part of the MoE blocks and rank: calls, p50 / p99 / mean µs, tail
    ratio and tokens. Empty for a run without expert-parallel MoE blocks."""
    sql = """SELECT layer_type, {phase} AS ph, coalesce(rank, 0) AS rk, count(*),
                    quantile_cont(duration_us, [0.5, 0.99]), avg(duration_us), coalesce(sum(tokens), 0)
             FROM events WHERE run_id = $run AND source = 'layer' AND list_contains($parts, layer_type)
                  AND duration_us IS NOT NULL {where}
             GROUP BY ALL"""
    params = {"run": run_id, "parts": list(EXPERT_PARALLEL_LAYER_TYPES), "all_phases": ALL_PHASES}
    rows = [
        RankRow(lt, phase, rank, calls, p50, p99, mean, p99 / p50 if p50 else None, int(tokens))
        for lt, phase, rank, calls, (p50, p99), mean, tokens in con.execute(_with_all_phases(sql), params).fetchall()
    ]
    rows.sort(key=lambda r: (phase_key(r.phase), type_key(r.layer_type), r.rank))
    return rows


def rank_tokens(con: duckdb.DuckDBPyConnection, run_id: str) -> list[RankTokens]:
    """Per phase (then ALL_PHASES) and rank: pairs sent by its dispatches and computed by its experts."""
    sql = """SELECT {phase} AS ph, coalesce(rank, 0) AS rk,
                    coalesce(sum(tokens) FILTER (WHERE layer_type = 'moe_dispatch'), 0),
                    coalesce(sum(tokens) FILTER (WHERE layer_type = 'moe_experts'), 0)
             FROM events WHERE run_id = $run AND source = 'layer'
                  AND layer_type IN ('moe_dispatch', 'moe_experts') {where}
             GROUP BY ALL"""
    rows = con.execute(_with_all_phases(sql), {"run": run_id, "all_phases": ALL_PHASES}).fetchall()
    received: dict[str, list[int]] = {}
    for phase, _, _, got in rows:
        received.setdefault(phase, []).append(got)
    result = []
    for phase, rank, sent, got in rows:
        mean = sum(received[phase]) / len(received[phase])
        result.append(RankTokens(phase, rank, int(sent), int(got), got / mean if mean else None))
    result.sort(key=lambda r: (phase_key(r.phase), r.rank))
    return result


# Per collective call (step, layer, layer_type) every rank's entry; the last rank's entry minus each
# rank's own is that rank's wait. Calls some rank did not record (a killed run's last step) are left out.
_ENTRIES_SQL = """
WITH entries AS (
    SELECT step, layer, layer_type, phase, coalesce(rank, 0) AS rk, start_us FROM events
    WHERE run_id = $run AND source = 'collective' AND list_contains($collectives, layer_type)
), calls AS (
    SELECT step, layer, layer_type, max(start_us) AS last_entry, arg_max(rk, start_us) AS last_rank,
           count(DISTINCT rk) AS ranks
    FROM entries GROUP BY step, layer, layer_type
)
SELECT e.layer_type, e.phase, e.step, e.layer, e.rk, c.last_entry - e.start_us AS wait_us, c.last_rank
FROM entries e JOIN calls c USING (step, layer, layer_type)
WHERE c.ranks = (SELECT count(DISTINCT rk) FROM entries)
"""


def stragglers(con: duckdb.DuckDBPyConnection, run_id: str) -> list[Straggler]:
    """Per collective (moe_dispatch, moe_combine) and phase (then ALL_PHASES): which rank the others
    waited for, how long, and which experts were hot on it (``placement`` says which it holds). Empty for
    a run of one rank."""
    rows = con.execute(_ENTRIES_SQL, {"run": run_id, "collectives": list(COLLECTIVES)}).fetchall()
    world_size = len({row[4] for row in rows})
    if world_size < 2:
        return []  # one rank waits for no one
    held = placement(con, run_id, world_size)
    groups: dict[tuple[str, str], list[tuple]] = {}
    for row in rows:
        groups.setdefault((row[0], row[1]), []).append(row)
        groups.setdefault((row[0], ALL_PHASES), []).append(row)
    result = []
    for (layer_type, phase), group in groups.items():
        last = {(step, layer): last_rank for _, _, step, layer, _, _, last_rank in group}
        counts: dict[int, int] = {}
        for rank in last.values():
            counts[rank] = counts.get(rank, 0) + 1
        straggler = max(sorted(counts), key=counts.__getitem__)
        waits = sorted(wait for *_, rank, wait, last_rank in group if rank != last_rank)
        calls_on_it = [key for key, rank in last.items() if rank == straggler]
        hot = _hot_experts(con, run_id, calls_on_it, lambda layer, r=straggler: held(layer, r))
        result.append(
            Straggler(layer_type, phase, len(last), dict(sorted(counts.items())), straggler,
                      _quantile(waits, 0.5), _quantile(waits, 0.99), waits[-1] if waits else None, hot)
        )  # fmt: skip
    result.sort(key=lambda r: (phase_key(r.phase), COLLECTIVES.index(r.layer_type)))
    return result


def _quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (as quantile_cont), of sorted ``values``."""
    if not values:
        return None
    position = q * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def placement(con: duckdb.DuckDBPyConnection, run_id: str, world_size: int) -> Callable[[int, int], set[int]]:
    """held(layer, rank): the experts a rank held in a layer. From the run's notes where they give a
    placement (``{"placement": {layer: physical_to_logical}}``, rank r holding slots [r * S, (r + 1) * S),
    as ``shard_experts(model, placement=...)`` takes it), else E / W contiguous experts per rank (E from
    the run's config); nothing when neither is known."""
    config_json, notes_json = con.execute("SELECT config_json, notes FROM runs WHERE run_id = ?", [run_id]).fetchone()
    num_experts = _json_field(config_json, "moe", "num_experts")
    layouts = _json_field(notes_json, "placement") or {}

    def held(layer: int, rank: int) -> set[int]:
        slots = layouts.get(str(layer)) if isinstance(layouts, dict) else None
        if isinstance(slots, list) and len(slots) % world_size == 0:
            per_rank = len(slots) // world_size
            return set(slots[rank * per_rank : (rank + 1) * per_rank])
        if isinstance(num_experts, int) and num_experts % world_size == 0:
            per_rank = num_experts // world_size
            return set(range(rank * per_rank, (rank + 1) * per_rank))
        return set()

    return held


def _json_field(text: str | None, *keys: str) -> object:
    try:
        value = json.loads(text) if text else None
        for key in keys:
            value = value[key]
        return value
    except (ValueError, TypeError, KeyError):
        return None


def _hot_experts(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    calls: list[tuple[int, int]],
    held: Callable[[int], set[int]],
    count: int = 3,
) -> tuple[tuple[int, int, float], ...]:
    """Of the experts ``held(layer)`` in each layer, the ``count`` with the most tokens in ``calls`` (step,
    layer), as (layer, expert, tokens / mean tokens per expert of that layer in those calls)."""
    if not calls:
        return ()
    rows = con.execute(
        """
        WITH picked AS (SELECT DISTINCT unnest($steps) AS step, unnest($layers) AS layer)
        SELECT r.layer, r.expert, sum(r.tokens) FROM routing r JOIN picked USING (step, layer)
        WHERE r.run_id = $run GROUP BY r.layer, r.expert
        """,
        {"steps": [s for s, _ in calls], "layers": [layer for _, layer in calls], "run": run_id},
    ).fetchall()
    totals: dict[int, list[int]] = {}
    for layer, _, tokens in rows:
        totals.setdefault(layer, []).append(tokens)
    loads = [
        (int(layer), int(expert), tokens / (sum(totals[layer]) / len(totals[layer])))
        for layer, expert, tokens in rows
        if tokens > 0 and expert in held(layer)
    ]
    loads.sort(key=lambda item: (-item[2], item[0], item[1]))
    return tuple(loads[:count])


@dataclass(frozen=True)
class RankReport:
    """Everything ``hybridlm report`` shows about the ranks of an expert-parallel run."""

    ranks: int
    parts: list[RankRow] = field(default_factory=list)
    tokens: list[RankTokens] = field(default_factory=list)
    stragglers: list[Straggler] = field(default_factory=list)


def rank_report(con: duckdb.DuckDBPyConnection, run_id: str) -> RankReport | None:
    """The expert-parallel sections of run ``run_id``; None for a run without expert-parallel MoE blocks."""
    parts = rank_decomposition(con, run_id)
    if not parts:
        return None
    ranks = len({row.rank for row in parts})
    return RankReport(ranks, parts, rank_tokens(con, run_id), stragglers(con, run_id))
