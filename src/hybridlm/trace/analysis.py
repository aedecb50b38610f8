"""Analysis of a trace database: where the time goes per layer type, and regressions against a baseline.

Pure functions over a DuckDB connection (`open_readonly(path)` or `TraceStore.connection`) and a
run id. Percentiles are computed inside DuckDB (`quantile_cont`, the same interpolation as
`percentile_cont` and numpy's `method="linear"`). Expert load lives in `trace/imbalance.py`.

    con = open_readonly("trace.duckdb")
    run_id = resolve_run(con)                      # the latest run
    rows = decomposition(con, run_id)              # per layer type x phase: p50, p99, tail, share
    changes = compare_runs(con_a, run_a, con, run_id)   # baseline a vs candidate b

Why per layer type: in a hybrid MoE the aggregate over all calls reads healthy (a published 60 s
H100 trace: median ~50 µs, p99 ~300 µs, the GPU 95-97% busy) while MoE all-to-all alone has a 69x
tail ratio (p50 180 µs, p99 12,400 µs; Mamba 2.3x, attention 3.6x); the
aggregate row is kept in every table to show what it hides.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from hybridlm.trace import classify
from hybridlm.trace.schema import EXPERT_PARALLEL_LAYER_TYPES, LAYER_TYPES, PHASES, TraceError

ALL_LAYERS = "all layers"  # layer_type of the aggregate row over every call of a phase
ALL_PHASES = "all"  # phase of the rows over every phase of a run
OTHER = "other"  # layer_type of kernels no rule or range attributed to a layer
# Kernel sources tried, in order, for a run without hybridlm block events.
KERNEL_SOURCES = ("cuda", "cpu")

# -- regression thresholds ---------------------------------------------------------------------------
# A (layer type, phase) regresses when the candidate's p50 rose by more than P50_THRESHOLD
# (relative) and MIN_ABS_US, with MIN_CALLS calls or more in both runs; or its p99 by more than
# P99_THRESHOLD and P99_MIN_ABS_US, with MIN_CALLS_P99 calls or more.
#
# Measured on this project's shared 2-core CPU machine with debug-tiny, one intra-op thread, 20
# generate calls x 8 new tokens per run (20 prefill and 140 decode calls per block; prompts of 12
# and 8 tokens, 16 and 6, or 6 and 4): 110 pairs of runs of the same code, recorded in two
# processes, back to back in one, or interleaved call by call; idle and beside 1 to 4 busy-loop
# processes, steady or in random bursts (then ~90 runs of tests/trace/test_regression_gate.py, whose
# same-code pair never flagged with these values). Largest rises of the candidate over the baseline:
#   - p50 of the blocks under 1 ms: +9% (+20 µs), whatever the load.
#   - p50 of the 1.3-3 ms Mamba-1 prefill block: +146% (2.6 -> 6.6 ms) beside one busy process,
#     +260% (2.2 -> 7.9 ms) beside four. A call the neighbours preempt waits out their slices (~4 ms
#     and more); once more than half of a block's calls are hit, its median moves by that much.
#     Only calls of about half a slice or longer are hit that often, so the median of a block can
#     move by a few times itself, never by 10x: P50_THRESHOLD = 3.0 (the p50 must more than
#     quadruple).
#   - p99 of 140-280 calls (the 2nd-4th largest): up to +68x (mlp, 130 µs -> 8.9 ms), +9 ms at most;
#     one or two preempted calls. No relative threshold separates that from a tail regression; an
#     absolute floor above two slices does: P99_MIN_ABS_US = 15 ms (and P99_THRESHOLD = 3.0).
#   - p99 of 20-40 calls is their maximum (linear interpolation between the top two): +16 ms beside
#     four busy processes. MIN_CALLS_P99 = 100 leaves such tails out of the gate.
#   - MIN_ABS_US = 100 µs keeps a cheap block (mlp, p50 ~50 µs) from flagging on jitter;
#     MIN_CALLS = 20: fewer calls give no stable median (the prefill of a short benchmark).
# A planted time.sleep(0.002) in every attention call raises its p50 by +770% (prefill, 275 ->
# 2,400 µs) and +1,190% (decode, 180 -> 2,320 µs), more under load: flagged with room to spare,
# while the mlp block right after it rises +29% (caches gone cold during the sleep) and is not.
# On a quiet machine of its own (idle pairs: p50 within +6%, p99 within +125%) a CI gate can pass
# much tighter thresholds to `compare_runs` / `report_main`.
P50_THRESHOLD = 3.0
MIN_ABS_US = 100.0
MIN_CALLS = 20
P99_THRESHOLD = 3.0
P99_MIN_ABS_US = 15_000.0
MIN_CALLS_P99 = 100


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    created_at: datetime | None
    kind: str | None
    model: str | None
    device: str | None
    command: str | None
    events_by_source: dict[str, int] = field(default_factory=dict)
    num_routing_rows: int = 0
    ended_at: datetime | None = None  # None: the run never ended (killed, interrupted), or an old file
    num_steps: int = 0  # distinct steps its events hold
    has_end_marker: bool = True  # False for a file written before runs.ended_at existed

    @property
    def num_events(self) -> int:
        return sum(self.events_by_source.values())

    @property
    def is_complete(self) -> bool | None:
        """True once the run was marked ended; False for a run killed or interrupted before its end;
        None when the file predates end markers."""
        if not self.has_end_marker:
            return None
        return self.ended_at is not None


@dataclass(frozen=True)
class DecompositionRow:
    layer_type: str  # a layer type, OTHER, or ALL_LAYERS for the aggregate row
    phase: str  # prefill / decode / train / ..., or ALL_PHASES
    calls: int
    p50_us: float
    p99_us: float
    mean_us: float
    total_us: float
    wall_us: float | None  # the phase's wall time that share_of_wall divides by
    wall_basis: str  # 'steps' (summed forward steps) or 'span' (first start to last end of the events)
    tail_ratio: float | None  # p99 / p50; None when p50 is 0
    share_of_wall: float | None  # time the calls cover / wall_us (= total_us / wall_us for block calls)
    source: str  # the events decomposed: 'layer', 'cuda', 'cpu', ...
    ranks: int = 1  # ranks whose events the row pools (expert parallelism); wall_us sums their steps

    @property
    def is_aggregate(self) -> bool:
        return self.layer_type == ALL_LAYERS


@dataclass(frozen=True)
class Change:
    """One (layer type, phase) of a baseline run `a` against a candidate run `b`."""

    layer_type: str
    phase: str
    calls_a: int
    calls_b: int
    p50_a: float | None
    p50_b: float | None
    p99_a: float | None
    p99_b: float | None
    p50_change: float | None  # (b - a) / a
    p99_change: float | None
    is_regression: bool
    reason: str  # why it is (or is not) flagged, in words


# -- runs ------------------------------------------------------------------------------------------


def _has_end_marker(con: duckdb.DuckDBPyConnection) -> bool:
    found = con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'runs' AND column_name = 'ended_at'"
    ).fetchone()
    return bool(found[0])


def _run_sql(con: duckdb.DuckDBPyConnection) -> str:
    ended = "ended_at" if _has_end_marker(con) else "NULL"
    return f"SELECT run_id, created_at, kind, model, device, command, {ended} FROM runs"


def _summary(row: tuple, counts: dict[str, int], routing: int, steps: int, has_end_marker: bool) -> RunSummary:
    return RunSummary(*row[:6], counts, routing, row[6], steps, has_end_marker)


def runs(con: duckdb.DuckDBPyConnection) -> list[RunSummary]:
    """Every run in the file, oldest first, with its event counts per source (one scan of the events)."""
    counts: dict[str, dict[str, int]] = {}
    for run_id, source, n in con.execute(
        "SELECT run_id, source, count(*) FROM events GROUP BY ALL ORDER BY run_id, source"
    ).fetchall():
        counts.setdefault(run_id, {})[source] = n
    steps = dict(con.execute("SELECT run_id, count(DISTINCT step) FROM events GROUP BY run_id").fetchall())
    routing = dict(con.execute("SELECT run_id, count(*) FROM routing GROUP BY run_id").fetchall())
    rows = con.execute(_run_sql(con) + " ORDER BY created_at, rowid").fetchall()
    marker = _has_end_marker(con)
    return [_summary(r, counts.get(r[0], {}), routing.get(r[0], 0), steps.get(r[0], 0), marker) for r in rows]


def resolve_run(con: duckdb.DuckDBPyConnection, run_id: str | None = None) -> str:
    """`run_id` if the file has it, the latest run when None; TraceError naming the known runs."""
    ids = [row[0] for row in con.execute("SELECT run_id FROM runs ORDER BY created_at, rowid").fetchall()]
    if not ids:
        raise TraceError("the trace database holds no runs; record one with `hybridlm profile` or `hybridlm import`")
    if run_id is None:
        return ids[-1]
    if run_id in ids:
        return run_id
    listing = ", ".join(f"{r.run_id} ({r.kind}, {r.model or 'unnamed'}, {r.num_events:,} events)" for r in runs(con))
    raise TraceError(f"no run {run_id!r} in this trace database; known runs, oldest first: {listing}")


def run_summary(con: duckdb.DuckDBPyConnection, run_id: str) -> RunSummary:
    """One run's `runs` row and its event counts; TraceError naming the known runs if it is not there."""
    rows = con.execute(_run_sql(con) + " WHERE run_id = ?", [run_id]).fetchall()
    if not rows:
        resolve_run(con, run_id)  # raises, listing the known runs
    counts = dict(
        con.execute(
            "SELECT source, count(*) FROM events WHERE run_id = ? GROUP BY source ORDER BY 1", [run_id]
        ).fetchall()
    )
    [(num_steps,)] = con.execute("SELECT count(DISTINCT step) FROM events WHERE run_id = ?", [run_id]).fetchall()
    [(num_routing,)] = con.execute("SELECT count(*) FROM routing WHERE run_id = ?", [run_id]).fetchall()
    return _summary(rows[0], counts, num_routing, num_steps, _has_end_marker(con))


def decomposable_source(con: duckdb.DuckDBPyConnection, run_id: str, source: str | None = None) -> str | None:
    """`event_source`, or None when the run holds nothing to decompose (an empty or killed run)
    and no `source` was asked for."""
    if source is None:
        [(n,)] = con.execute(
            "SELECT count(*) FROM events WHERE run_id = ? AND source IS NOT NULL AND source != 'step'", [run_id]
        ).fetchall()
        if n == 0:
            return None
    return event_source(con, run_id, source)


def run_identity(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple[str | None, str | None]:
    """(model name, layer pattern) of a run, as its runs row says; None where it does not say."""
    model, config_json = con.execute("SELECT model, config_json FROM runs WHERE run_id = ?", [run_id]).fetchone()
    pattern = None
    if config_json:
        try:
            config = json.loads(config_json)
        except ValueError:
            config = None
        if isinstance(config, dict) and isinstance(config.get("pattern"), str):
            pattern = config["pattern"]
    return model, pattern


def event_source(con: duckdb.DuckDBPyConnection, run_id: str, source: str | None = None) -> str:
    """The events a decomposition reads: hybridlm's block calls ('layer') when the run has them,
    else GPU kernels ('cuda'), else CPU operators ('cpu'), else the run's most frequent source.
    An explicit `source` must exist in the run."""
    counts = dict(
        con.execute(
            "SELECT source, count(*) FROM events WHERE run_id = ? AND source IS NOT NULL GROUP BY source", [run_id]
        ).fetchall()
    )
    if source is not None:
        if source not in counts:
            have = ", ".join(f"{s} ({n:,})" for s, n in sorted(counts.items())) or "none"
            raise TraceError(f"run {run_id} has no events with source {source!r}; its sources: {have}")
        return source
    for candidate in ("layer", *KERNEL_SOURCES):
        if candidate in counts:
            return candidate
    others = {s: n for s, n in counts.items() if s != "step"}
    if not others:
        raise TraceError(f"run {run_id} has no events to decompose")
    return max(sorted(others), key=others.__getitem__)


# -- decomposition -----------------------------------------------------------------------------------


def type_key(layer_type: str) -> tuple:
    if layer_type == ALL_LAYERS:
        return (3, "")
    if layer_type == OTHER:
        return (2, "")
    if layer_type in LAYER_TYPES:
        return (0, LAYER_TYPES.index(layer_type))
    return (1, layer_type)


def phase_key(phase: str) -> tuple:
    if phase == ALL_PHASES:
        return (2, "")
    if phase in PHASES:
        return (0, PHASES.index(phase))
    return (1, phase)


def wall_times(con: duckdb.DuckDBPyConnection, run_id: str, source: str) -> tuple[dict[str, float], str]:
    """({phase or ALL_PHASES: wall µs}, basis): what a share of wall time divides by.

    basis 'steps': the summed durations of the run's 'step' events (one per forward step), where it
    has them, as a recorded run does; basis 'span': else (an imported kernel trace) the span, last
    end - first start, of the `source` events, per phase and overall.
    """
    has_steps = con.execute("SELECT count(*) FROM events WHERE run_id = ? AND source = 'step'", [run_id]).fetchone()
    if has_steps[0] and source != "step":
        basis = "steps"
        sql = (
            "SELECT phase, grouping(phase), sum(duration_us) FROM events WHERE run_id = ? AND source = 'step' "
            "GROUP BY GROUPING SETS ((phase), ())"
        )
        params = [run_id]
    else:
        basis = "span"
        sql = (
            "SELECT phase, grouping(phase), max(start_us + duration_us) - min(start_us) FROM events "
            "WHERE run_id = ? AND source = ? AND start_us IS NOT NULL AND duration_us IS NOT NULL "
            "GROUP BY GROUPING SETS ((phase), ())"
        )
        params = [run_id, source]
    walls = {}
    for phase, is_all, wall in con.execute(sql, params).fetchall():
        if is_all:
            walls[ALL_PHASES] = wall
        elif phase is not None:
            walls[phase] = wall
    return walls, basis


# Time covered by each (layer type, phase) group's calls: the length of the union of their
# intervals, by the gaps-and-islands method (a call opens a new island when it starts after every
# earlier call of its group has ended). Calls that overlap (a CPU operator and the operators it
# calls, kernels on two streams) count once; block calls never overlap, so for them it is their sum.
# Each rank's calls are united apart (ranks run at the same time; their wall times add up, see
# `wall_times`), and the aggregate leaves out the parts of expert-parallel MoE blocks, which lie
# inside the block's own call.
_COVERED_SQL = """
WITH e AS (
    SELECT coalesce(layer_type, $other) AS lt, phase, coalesce(rank, 0) AS rk, start_us AS s,
           start_us + duration_us AS f
    FROM events WHERE run_id = $run AND source = $source AND start_us IS NOT NULL AND duration_us IS NOT NULL
), keyed AS (
    SELECT lt, phase, rk, s, f FROM e WHERE phase IS NOT NULL
    UNION ALL SELECT lt, $all_phases, rk, s, f FROM e
    UNION ALL SELECT $all_layers, phase, rk, s, f FROM e WHERE phase IS NOT NULL AND NOT list_contains($parts, lt)
    UNION ALL SELECT $all_layers, $all_phases, rk, s, f FROM e WHERE NOT list_contains($parts, lt)
), marked AS (
    SELECT lt, phase, rk, s, f,
           max(f) OVER (PARTITION BY lt, phase, rk ORDER BY s, f ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS seen
    FROM keyed
), islands AS (
    SELECT lt, phase, rk, s, f,
           sum(CASE WHEN seen IS NULL OR s > seen THEN 1 ELSE 0 END)
               OVER (PARTITION BY lt, phase, rk ORDER BY s, f ROWS UNBOUNDED PRECEDING) AS island
    FROM marked
)
SELECT lt, phase, sum(length) FROM (
    SELECT lt, phase, max(f) - min(s) AS length FROM islands GROUP BY lt, phase, rk, island
) GROUP BY lt, phase
"""


def covered_times(con: duckdb.DuckDBPyConnection, run_id: str, source: str) -> dict[tuple[str, str], float]:
    """{(layer type or ALL_LAYERS, phase or ALL_PHASES): µs during which a call of that group ran}."""
    params = {"run": run_id, "source": source, "other": OTHER, "all_phases": ALL_PHASES, "all_layers": ALL_LAYERS,
              "parts": list(EXPERT_PARALLEL_LAYER_TYPES)}  # fmt: skip
    return {(lt, phase): covered for lt, phase, covered in con.execute(_COVERED_SQL, params).fetchall()}


# Per (layer type, phase), per layer type, and the aggregates per phase and overall. The aggregates pool
# every call but the parts of expert-parallel MoE blocks (EXPERT_PARALLEL_LAYER_TYPES): those lie inside
# the block's own call ('moe'), which the aggregate already holds.
_DECOMPOSITION_SQL = """
WITH e AS (
    SELECT coalesce(layer_type, $other) AS lt, phase, duration_us FROM events
    WHERE run_id = $run AND source = $source AND duration_us IS NOT NULL
)
SELECT lt, phase, grouping(lt), grouping(phase), count(*), quantile_cont(duration_us, [0.5, 0.99]),
       avg(duration_us), sum(duration_us)
FROM e GROUP BY GROUPING SETS ((lt, phase), (lt))
UNION ALL
SELECT NULL, phase, 1, grouping(phase), count(*), quantile_cont(duration_us, [0.5, 0.99]), avg(duration_us),
       sum(duration_us)
FROM e WHERE NOT list_contains($parts, lt) GROUP BY GROUPING SETS ((phase), ()) HAVING count(*) > 0
"""


def decomposition(
    con: duckdb.DuckDBPyConnection, run_id: str, phase: str | None = None, *, source: str | None = None
) -> list[DecompositionRow]:
    """Per layer type: calls, p50 / p99 / mean µs, tail ratio and share of wall time.

    With `phase=None`, rows for each phase the run has (prefill, decode, train, ...) and then for
    ALL_PHASES; with a phase, that phase's rows only. Each phase ends with the aggregate row
    (layer_type ALL_LAYERS) over every call (but the parts of an expert-parallel MoE block, which lie
    inside its 'moe' call). `source` picks the events (see `event_source`):
    block calls for a recorded run, kernels (layer_type from the importer; NULL -> OTHER) for an
    imported one. Events without a phase (kernels of an imported trace) appear in ALL_PHASES only.

    share_of_wall is the time the type's calls cover divided by the wall time (`wall_times`): for
    block calls, which never overlap, their summed duration; nested CPU operators or kernels
    overlapping on several streams count once, so that no share exceeds 100%. A run of several ranks
    pools their calls: each rank's calls are united apart, and its wall time sums their steps.
    """
    source = event_source(con, run_id, source)
    rows = con.execute(_DECOMPOSITION_SQL, {"other": OTHER, "run": run_id, "source": source,
                                            "parts": list(EXPERT_PARALLEL_LAYER_TYPES)}).fetchall()  # fmt: skip
    walls, basis = wall_times(con, run_id, source)
    [(ranks,)] = con.execute(
        "SELECT count(DISTINCT coalesce(rank, 0)) FROM events WHERE run_id = ? AND source = ?", [run_id, source]
    ).fetchall()
    covered = covered_times(con, run_id, source)
    result = []
    for layer_type, row_phase, all_types, all_phases, calls, (p50, p99), mean, total in rows:
        if not all_phases and row_phase is None:
            continue  # calls outside any step: counted in ALL_PHASES only
        label = ALL_PHASES if all_phases else row_phase
        if phase is not None and label != phase:
            continue
        group = ALL_LAYERS if all_types else layer_type
        wall = walls.get(label)
        busy = covered.get((group, label))
        result.append(
            DecompositionRow(
                layer_type=group,
                phase=label,
                calls=calls,
                p50_us=p50,
                p99_us=p99,
                mean_us=mean,
                total_us=total,
                wall_us=wall,
                wall_basis=basis,
                tail_ratio=p99 / p50 if p50 else None,
                share_of_wall=busy / wall if wall and busy is not None else None,
                source=source,
                ranks=max(ranks, 1),
            )
        )
    if phase is not None and not result:
        have = sorted({r[1] for r in rows if r[1] is not None and not r[3]}, key=phase_key)
        raise TraceError(f"run {run_id} has no {source!r} events in phase {phase!r}; its phases: {have or 'none'}")
    result.sort(key=lambda r: (phase_key(r.phase), type_key(r.layer_type)))
    return result


# -- attribution rules -------------------------------------------------------------------------------

RULE_RECORDED = "recorded block call"  # hybridlm's own block events: their layer type is the block's
RULE_NONE = "unattributed"  # no rule said anything: layer type OTHER
RULE_UNKNOWN = "unknown (file predates layer_rule)"


@dataclass(frozen=True)
class RuleRow:
    """How much of a run's event time one attribution rule (classify.RULES) labelled."""

    rule: str
    layer_types: tuple[str, ...]  # the layer types it gave
    events: int
    total_us: float  # summed duration of those events
    share: float | None  # total_us / summed duration of every event of the source


def attribution_rules(con: duckdb.DuckDBPyConnection, run_id: str, source: str | None = None) -> list[RuleRow]:
    """Per attribution rule: the events (of the decomposed `source`) whose layer type it gave, and
    their share of the summed event time; empty for a run without events to decompose."""
    source = decomposable_source(con, run_id, source)
    if source is None:
        return []
    has_rule = con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'events' AND column_name = 'layer_rule'"
    ).fetchone()[0]
    rule = "layer_rule" if has_rule else "NULL"
    rows = con.execute(
        f"""
        SELECT coalesce({rule}, CASE WHEN source = 'layer' THEN $recorded WHEN layer_type IS NULL THEN $none
                                     ELSE $unknown END) AS rule,
               list(DISTINCT coalesce(layer_type, $other)), count(*), coalesce(sum(duration_us), 0)
        FROM events WHERE run_id = $run AND source = $source GROUP BY rule
        """,
        {"run": run_id, "source": source, "recorded": RULE_RECORDED, "none": RULE_NONE, "unknown": RULE_UNKNOWN,
         "other": OTHER},
    ).fetchall()  # fmt: skip
    total = sum(r[3] for r in rows)
    order = (RULE_RECORDED, *classify.RULES, RULE_UNKNOWN, RULE_NONE)
    result = [
        RuleRow(name, tuple(sorted(types, key=type_key)), events, float(time), time / total if total else None)
        for name, types, events, time in rows
    ]
    result.sort(key=lambda r: order.index(r.rule) if r.rule in order else len(order))
    return result


# -- MoE imbalance -----------------------------------------------------------------------------------

# -- comparison ---------------------------------------------------------------------------------------


def _relative(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a <= 0:
        return None
    return (b - a) / a


def compare_runs(
    con_a: duckdb.DuckDBPyConnection,
    run_a: str,
    con_b: duckdb.DuckDBPyConnection,
    run_b: str,
    p50_threshold: float = P50_THRESHOLD,
    p99_threshold: float = P99_THRESHOLD,
    *,
    min_calls: int = MIN_CALLS,
    min_abs_us: float = MIN_ABS_US,
    p99_min_abs_us: float = P99_MIN_ABS_US,
    min_calls_p99: int = MIN_CALLS_P99,
    source: str | None = None,
) -> list[Change]:
    """Baseline `a` vs candidate `b`, per (layer type, phase) of their decompositions.

    A row is a regression when b's p50 rose by more than `p50_threshold` (relative) and
    `min_abs_us`, with `min_calls` calls or more in both runs; or its p99 by more than
    `p99_threshold` and `p99_min_abs_us`, with `min_calls_p99` calls or more. Aggregate rows are
    listed but never flag: a regression is put on a layer type. The comment above P50_THRESHOLD
    says how the defaults were measured.
    """
    source_a = event_source(con_a, run_a, source)
    source_b = event_source(con_b, run_b, source)
    if source_a != source_b:
        raise TraceError(
            f"cannot compare run {run_a} ({source_a!r} events) with run {run_b} ({source_b!r} events); "
            "pass the same source for both"
        )
    rows_a = {(r.layer_type, r.phase): r for r in decomposition(con_a, run_a, source=source_a)}
    rows_b = {(r.layer_type, r.phase): r for r in decomposition(con_b, run_b, source=source_b)}
    keys = sorted(rows_a.keys() | rows_b.keys(), key=lambda k: (phase_key(k[1]), type_key(k[0])))
    changes = []
    for key in keys:
        a, b = rows_a.get(key), rows_b.get(key)
        p50_a, p50_b = (a.p50_us if a else None), (b.p50_us if b else None)
        p99_a, p99_b = (a.p99_us if a else None), (b.p99_us if b else None)
        p50_change, p99_change = _relative(p50_a, p50_b), _relative(p99_a, p99_b)
        is_regression = False
        if a is None or b is None:
            reason = "only in the candidate" if a is None else "only in the baseline"
        elif key[0] == ALL_LAYERS:
            reason = "aggregate (never gates)"
        elif min(a.calls, b.calls) < min_calls:
            reason = f"too few calls (< {min_calls})"
        else:
            reasons = []
            if p50_b - p50_a > max(p50_threshold * p50_a, min_abs_us):
                reasons.append(f"p50 {p50_change:+.0%} ({p50_b - p50_a:+,.0f} µs)")
            if min(a.calls, b.calls) >= min_calls_p99 and p99_b - p99_a > max(p99_threshold * p99_a, p99_min_abs_us):
                reasons.append(f"p99 {p99_change:+.0%} ({p99_b - p99_a:+,.0f} µs)")
            is_regression = bool(reasons)
            reason = "; ".join(reasons) if reasons else "within thresholds"
        changes.append(
            Change(
                layer_type=key[0],
                phase=key[1],
                calls_a=a.calls if a else 0,
                calls_b=b.calls if b else 0,
                p50_a=p50_a,
                p50_b=p50_b,
                p99_a=p99_a,
                p99_b=p99_b,
                p50_change=p50_change,
                p99_change=p99_change,
                is_regression=is_regression,
                reason=reason,
            )
        )
    return changes


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those become None."""
    if value is None or not math.isfinite(value):
        return None
    return value
