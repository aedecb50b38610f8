"""MoE expert load per layer and phase, and how the block's latency moves with it.

    rows = moe_imbalance(con, run_id)   # per MoE layer x phase: imbalance p50 / p99, latency trend

imbalance = max tokens on one expert / mean tokens per expert, per step, from the ``routing`` table.
On a GPU the all-to-all waits for the busiest expert, so latency rises with imbalance; on a CPU the
opposite can show (fewer distinct experts, fewer matmuls), which the trend reports as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np

from hybridlm.trace.analysis import phase_key, resolve_run
from hybridlm.trace.schema import EXPERT_PARALLEL_LAYER_TYPES


@dataclass(frozen=True)
class LatencyVsImbalance:
    """How the MoE block's latency moves with its expert imbalance, over the steps of one phase.

    `low` / `high` are the steps at or below the 25th percentile of imbalance and at or above the
    75th (`split = 'quartiles'`, 20 steps or more), else below / above the median ('halves').
    """

    steps: int
    split: str | None  # 'quartiles', 'halves', or None when imbalance does not vary enough
    low_steps: int
    high_steps: int
    low_imbalance: float | None  # mean imbalance of the low group
    high_imbalance: float | None
    low_p50_us: float | None  # median block latency of the low group
    high_p50_us: float | None
    ratio: float | None  # high_p50_us / low_p50_us
    spearman: float | None  # rank correlation of imbalance and latency over all steps


@dataclass(frozen=True)
class ImbalanceRow:
    """Expert load of one MoE layer in one phase: imbalance = max tokens on one expert / mean per expert."""

    layer: int
    phase: str
    steps: int
    num_experts: int
    mean_tokens_per_expert: float
    p50: float
    p99: float
    mean: float
    max: float
    dropped: int
    latency_vs_imbalance: LatencyVsImbalance | None  # None: too few steps with a block time


# Per (layer, phase, step): the load of each expert (calls of a layer within one step summed: an
# explicit training step may run the model twice), then max / mean over the experts. The mean is
# over the routing rows, which list every expert, idle ones with 0 tokens, as the Tracer writes them.
_PER_STEP_SQL = """
WITH per_expert AS (
    SELECT layer, phase, step, expert, sum(tokens) AS tokens, sum(coalesce(dropped, 0)) AS dropped
    FROM routing WHERE run_id = $run GROUP BY layer, phase, step, expert
), per_step AS (
    SELECT layer, phase, step, count(*) AS num_experts, avg(tokens) AS mean_tokens,
           max(tokens) / avg(tokens) AS imbalance, sum(dropped) AS dropped
    FROM per_expert GROUP BY layer, phase, step HAVING avg(tokens) > 0
)
"""


def moe_imbalance(con: duckdb.DuckDBPyConnection, run_id: str) -> list[ImbalanceRow]:
    """Per MoE layer and phase: imbalance (max tokens on one expert / mean tokens per expert) per
    step, its p50 / p99 over steps, and how the block's latency moves with it.

    Empty for a run without routing rows (an imported kernel trace).
    """
    resolve_run(con, run_id)
    stats = con.execute(
        _PER_STEP_SQL
        + """
        SELECT layer, phase, count(*), max(num_experts), avg(mean_tokens),
               quantile_cont(imbalance, [0.5, 0.99]), avg(imbalance), max(imbalance), sum(dropped)
        FROM per_step GROUP BY layer, phase
        """,
        {"run": run_id},
    ).fetchall()
    series = imbalance_and_latency(con, run_id)
    result = []
    for layer, phase, steps, num_experts, mean_tokens, (p50, p99), mean, maximum, dropped in stats:
        pairs = series.get((layer, phase), [])
        result.append(
            ImbalanceRow(
                layer=layer,
                phase=phase,
                steps=steps,
                num_experts=num_experts,
                mean_tokens_per_expert=mean_tokens,
                p50=p50,
                p99=p99,
                mean=mean,
                max=maximum,
                dropped=int(dropped or 0),
                latency_vs_imbalance=latency_vs_imbalance([p[0] for p in pairs], [p[1] for p in pairs]),
            )
        )
    result.sort(key=lambda r: (r.layer, phase_key(r.phase or "")))
    return result


def imbalance_and_latency(
    con: duckdb.DuckDBPyConnection, run_id: str
) -> dict[tuple[int, str], list[tuple[float, float]]]:
    """(layer, phase) -> [(imbalance, block latency in us)] per step, in step order.

    The latency is the block's time in that step on its slowest rank: ranks of an expert-parallel run
    wait for each other in the all-to-all, and the parts of their MoE blocks (moe_router, moe_dispatch,
    moe_experts, moe_combine) lie inside the block's own call, so they are not added again. A run of one
    process has one rank: the block's time.
    """
    series: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for layer, phase, imbalance, duration in con.execute(
        _PER_STEP_SQL
        + """
        SELECT p.layer, p.phase, p.imbalance, e.duration_us
        FROM per_step p JOIN (
            SELECT step, layer, max(duration_us) AS duration_us FROM (
                SELECT step, layer, coalesce(rank, 0) AS rank, sum(duration_us) AS duration_us FROM events
                WHERE run_id = $run AND source = 'layer' AND duration_us IS NOT NULL
                  AND layer_type NOT IN (SELECT unnest($parts))
                GROUP BY step, layer, rank
            ) GROUP BY step, layer
        ) e ON e.step = p.step AND e.layer = p.layer
        ORDER BY p.layer, p.phase, p.step
        """,
        {"run": run_id, "parts": list(EXPERT_PARALLEL_LAYER_TYPES)},
    ).fetchall():
        series.setdefault((layer, phase), []).append((imbalance, duration))
    return series


MIN_TREND_STEPS = 8  # fewer steps than this: no latency-vs-imbalance figure at all
QUARTILE_STEPS = 20  # from this many steps on, compare quartiles rather than halves


def latency_vs_imbalance(imbalance: Sequence[float], latency_us: Sequence[float]) -> LatencyVsImbalance | None:
    """Median latency of the least and most imbalanced steps, and the rank correlation.

    None below MIN_TREND_STEPS steps. Imbalance takes few distinct values at small batch (4 token
    assignments over 8 experts give max/mean of 2 or 4 only), so the groups are cut by value
    (ties stay together) and each must hold 2 steps; otherwise the group fields are None.
    """
    x = np.asarray(imbalance, dtype=np.float64)
    y = np.asarray(latency_us, dtype=np.float64)
    n = len(x)
    if n < MIN_TREND_STEPS:
        return None
    low = high = None
    split = None
    if n >= QUARTILE_STEPS:
        low_cut, high_cut = np.percentile(x, [25, 75])
        if low_cut < high_cut:
            low, high, split = x <= low_cut, x >= high_cut, "quartiles"
    if split is None:
        median = np.median(x)
        low, high = x <= median, x > median
        if not high.any():
            low, high = x < median, x >= median
        split = "halves"
    if low.sum() < 2 or high.sum() < 2:
        return LatencyVsImbalance(n, None, 0, 0, None, None, None, None, None, spearman(x, y))
    low_p50, high_p50 = float(np.median(y[low])), float(np.median(y[high]))
    return LatencyVsImbalance(
        steps=n,
        split=split,
        low_steps=int(low.sum()),
        high_steps=int(high.sum()),
        low_imbalance=float(x[low].mean()),
        high_imbalance=float(x[high].mean()),
        low_p50_us=low_p50,
        high_p50_us=high_p50,
        ratio=high_p50 / low_p50 if low_p50 > 0 else None,
        spearman=spearman(x, y),
    )


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of average ranks); None for < 3 points or a constant series."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rx, ry = _average_ranks(x), _average_ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])
