"""Reports of a trace database: tables (rich text or JSON), a PNG, a Perfetto trace, the CI gate.

`report_main` is `hybridlm report DB [--run ID] [--baseline DB2 [--run2 ID]] [--plot out.png]
[--perfetto out.json] [--json]`: it prints the per-layer-type decomposition and MoE imbalance of a
run (the latest by default), compares it with a baseline run when given one, writes the files, and
returns 1 when the comparison flags a regression (else 0), so CI can gate on it.
`print_profile_summary` prints the same tables after `hybridlm profile`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import duckdb
import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from hybridlm.trace import analysis
from hybridlm.trace.analysis import (
    ALL_LAYERS,
    ALL_PHASES,
    OTHER,
    Change,
    DecompositionRow,
    ImbalanceRow,
    RunSummary,
    finite_or_none,
)
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import open_readonly

# One colour per layer type, the same in every panel and every plot (matplotlib's tab10 hues).
LAYER_COLORS = {
    "mamba2": "#1f77b4",
    "mamba": "#17becf",
    "gdn": "#2ca02c",
    "attention": "#d62728",
    "mlp": "#7f7f7f",
    "moe": "#ff7f0e",
    "moe_a2a": "#9467bd",
    "parallel": "#8c564b",
    "comm": "#e377c2",
    OTHER: "#bcbd22",
}
_SPARE_COLORS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")


def layer_color(layer_type: str) -> str:
    if layer_type in LAYER_COLORS:
        return LAYER_COLORS[layer_type]
    return _SPARE_COLORS[sum(map(ord, layer_type)) % len(_SPARE_COLORS)]  # stable across runs


# -- number formats ----------------------------------------------------------------------------------


def _us(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _change(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def _wall(us: float | None) -> str:
    if us is None:
        return "unknown"
    return f"{us / 1e6:,.2f} s" if us >= 1e6 else f"{us / 1e3:,.1f} ms"


# -- tables --------------------------------------------------------------------------------------------


def _run_line(run: RunSummary, source: str | None) -> str:
    created = run.created_at.isoformat(sep=" ", timespec="seconds") if run.created_at else "?"
    counts = ", ".join(f"{n:,} {s}" for s, n in sorted(run.events_by_source.items())) or "no events"
    parts = [f"run {run.run_id}", run.model or "unnamed model", f"{run.kind or '?'} {created}"]
    if run.device:
        parts.append(run.device)
    parts.append(counts)
    if source:
        parts.append(f"decomposed: {source!r} events")
    return " · ".join(parts)


def _aggregate_label(source: str) -> str:
    return f"{ALL_LAYERS} (aggregate)" if source == "layer" else f"all {source} events (aggregate)"


def _decomposition_tables(rows: Sequence[DecompositionRow]) -> list[Table]:
    tables = []
    phases = list(dict.fromkeys(r.phase for r in rows))
    for phase in phases:
        group = [r for r in rows if r.phase == phase]
        wall_from = "forward steps" if group[0].wall_basis == "steps" else f"span of the {group[0].source} events"
        title = f"phase {phase}: wall time {_wall(group[0].wall_us)} ({wall_from})"
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, header_style="bold")
        table.add_column("layer type", justify="left", no_wrap=True)
        for name in ("calls", "p50 µs", "p99 µs", "tail ratio p99/p50", "share of wall time"):
            table.add_column(name, justify="right", no_wrap=True)
        for row in group:
            if row.is_aggregate:
                table.add_section()
            table.add_row(
                _aggregate_label(row.source) if row.is_aggregate else row.layer_type,
                f"{row.calls:,}",
                _us(row.p50_us),
                _us(row.p99_us),
                _ratio(row.tail_ratio),
                _share(row.share_of_wall),
                style="italic" if row.is_aggregate else None,
            )
        tables.append(table)
    return tables


def _imbalance_table(rows: Sequence[ImbalanceRow]) -> Table:
    table = Table(
        title="MoE expert imbalance per step (max tokens on one expert / mean tokens per expert; 1.0 = even)",
        title_justify="left",
        caption=(
            f"MoE block p50 latency in the least / most imbalanced steps (quartiles from "
            f"{analysis.QUARTILE_STEPS} steps, else halves), and Spearman's rho over all steps; "
            f"'-' where a phase has fewer than {analysis.MIN_TREND_STEPS} steps or imbalance does not vary."
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    for name in ("layer", "phase"):
        table.add_column(name, justify="left", no_wrap=True)
    for name in ("steps", "experts", "tokens/expert", "imbalance p50", "p99", "max", "dropped"):
        table.add_column(name, justify="right", no_wrap=True)
    for name in ("low-imb. p50 µs", "high-imb. p50 µs", "high/low", "Spearman rho"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        trend = row.latency_vs_imbalance
        trend_cells = ["-"] * 4
        if trend is not None:
            rho = "-" if trend.spearman is None else f"{trend.spearman:+.2f}"
            trend_cells = [_us(trend.low_p50_us), _us(trend.high_p50_us), _ratio(trend.ratio), rho]
        table.add_row(
            f"L{row.layer}",
            row.phase or "-",
            f"{row.steps:,}",
            str(row.num_experts),
            f"{row.mean_tokens_per_expert:.2f}",
            f"{row.p50:.2f}",
            f"{row.p99:.2f}",
            f"{row.max:.2f}",
            f"{row.dropped:,}",
            *trend_cells,
        )
    return table


def _change_table(changes: Sequence[Change], title: str) -> Table:
    flagged = sum(c.is_regression for c in changes)
    table = Table(
        title=f"{title}: {flagged} regression{'s' * (flagged != 1)}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    table.add_column("", no_wrap=True)
    table.add_column("layer type", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    for name in ("calls base/cand", "p50 base", "p50 cand", "Δ p50", "p99 base", "p99 cand", "Δ p99"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for c in changes:
        table.add_row(
            "!!" if c.is_regression else "",
            c.layer_type,
            c.phase,
            f"{c.calls_a:,}/{c.calls_b:,}",
            _us(c.p50_a),
            _us(c.p50_b),
            _change(c.p50_change),
            _us(c.p99_a),
            _us(c.p99_b),
            _change(c.p99_change),
            f"REGRESSION: {c.reason}" if c.is_regression else c.reason,
            style="bold red" if c.is_regression else ("italic" if c.layer_type == ALL_LAYERS else None),
        )
    return table


def render_tables(
    rows: Sequence[DecompositionRow],
    imbalance: Sequence[ImbalanceRow] = (),
    changes: Sequence[Change] | None = None,
    *,
    run: RunSummary | None = None,
    comparison_title: str = "baseline vs candidate (µs)",
    color: bool = False,
    width: int = 200,
) -> str:
    """The decomposition (one table per phase, the aggregate row set apart), the MoE imbalance
    table when there are MoE layers, and the change table of a comparison, as text.

    Flagged changes are marked `!!` and `REGRESSION` (and red with `color`)."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        force_terminal=color,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
    )
    if run is not None:
        console.print(_run_line(run, rows[0].source if rows else None), markup=False)
    for table in _decomposition_tables(rows):
        console.print(table)
    if rows:
        console.print(
            "share of wall time = time that layer type's calls cover / the phase's wall time (overlapping calls count "
            "once). The aggregate row pools every call of the phase: it hides the per-type tails above it.",
            markup=False,
        )
    if imbalance:
        console.print()
        console.print(_imbalance_table(imbalance))
    if changes is not None:
        console.print()
        console.print(_change_table(changes, comparison_title))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def to_json(
    rows: Sequence[DecompositionRow],
    imbalance: Sequence[ImbalanceRow] = (),
    changes: Sequence[Change] | None = None,
    *,
    run: RunSummary | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The same data as `render_tables`, as a JSON document (NaN / infinity as null)."""
    doc: dict[str, Any] = {}
    if run is not None:
        doc["run"] = {**dataclasses.asdict(run), "num_events": run.num_events}
    doc["source"] = rows[0].source if rows else None
    doc["decomposition"] = [{**dataclasses.asdict(r), "is_aggregate": r.is_aggregate} for r in rows]
    doc["moe_imbalance"] = [dataclasses.asdict(r) for r in imbalance]
    if changes is not None:
        doc["comparison"] = {
            "changes": [dataclasses.asdict(c) for c in changes],
            "regressions": [f"{c.layer_type}/{c.phase}" for c in changes if c.is_regression],
        }
    if extra:
        doc.update(extra)
    return json.dumps(_plain(doc), indent=2)


# -- plot ---------------------------------------------------------------------------------------------


def _timeline_step(con: duckdb.DuckDBPyConnection, run_id: str, source: str) -> tuple[int | None, str]:
    """(step, description): the median-duration decode step (else of any phase) for a recorded
    run; for a kernel trace, the step whose events span the median time."""
    for phase in ("decode", None):
        steps = con.execute(
            "SELECT step, phase, duration_us FROM events WHERE run_id = ? AND source = 'step' "
            "AND (? IS NULL OR phase = ?) ORDER BY duration_us, step",
            [run_id, phase, phase],
        ).fetchall()
        if steps:
            step, step_phase, duration = steps[(len(steps) - 1) // 2]
            return step, f"{step_phase} step {step}: the median of {len(steps)} {phase or 'step'}s ({_us(duration)} µs)"
    spans = con.execute(
        "SELECT step, max(start_us + duration_us) - min(start_us) AS span FROM events "
        "WHERE run_id = ? AND source = ? AND step IS NOT NULL GROUP BY step ORDER BY span, step",
        [run_id, source],
    ).fetchall()
    if spans:
        step, span = spans[(len(spans) - 1) // 2]
        return step, f"step {step}: the median span of {len(spans)} steps ({_us(span)} µs)"
    return None, "the first events of the run (no steps recorded)"


def write_plot(
    con: duckdb.DuckDBPyConnection, run_id: str, path: str | os.PathLike, *, source: str | None = None
) -> Path:
    """PNG: left, the latency distribution of each layer type (per phase) on a log axis with its
    p50 and p99 marked; right, the timeline of one representative step, a bar per block (or
    kernel) coloured by layer type."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switch
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # boxplot's `orientation` exists from matplotlib 3.10; `vert` is deprecated from 3.11
    version = tuple(int(part) for part in matplotlib.__version__.split(".")[:2])
    horizontal = {"orientation": "horizontal"} if version >= (3, 10) else {"vert": False}
    run = analysis.run_summary(con, run_id)
    source = analysis.event_source(con, run_id, source)
    data = con.execute(
        "SELECT coalesce(layer_type, ?), phase, duration_us FROM events "
        "WHERE run_id = ? AND source = ? AND duration_us > 0",
        [OTHER, run_id, source],
    ).fetchall()
    if not data:
        raise TraceError(f"run {run_id} has no {source!r} events with a duration to plot")
    # events without a phase (an imported trace's kernels) are the whole run, or the part outside steps
    no_phase = ALL_PHASES if all(d[1] is None for d in data) else "no phase"
    by_key: dict[tuple[str, str], list[float]] = {}
    for layer_type, phase, duration in data:
        by_key.setdefault((layer_type, phase or no_phase), []).append(duration)
    types = sorted({k[0] for k in by_key}, key=analysis._type_key)
    phases = sorted({k[1] for k in by_key}, key=analysis._phase_key)

    fig = Figure(figsize=(16, 7.5))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    # Left: one row per layer type, one box per phase inside it.
    height = 0.8 / len(phases)
    hatches = {"prefill": "///", "train": "..."}
    for i, layer_type in enumerate(types):
        for j, phase in enumerate(phases):
            values = by_key.get((layer_type, phase))
            if not values:
                continue
            y = i + (j - (len(phases) - 1) / 2) * height
            parts = left.boxplot(
                [values],
                positions=[y],
                widths=height * 0.8,
                **horizontal,
                whis=(1, 99),
                patch_artist=True,
                showfliers=True,
                flierprops={"marker": ".", "markersize": 2, "alpha": 0.4, "markeredgecolor": "0.3"},
                medianprops={"color": "black", "linewidth": 1.8},
            )
            for patch in parts["boxes"]:
                patch.set_facecolor(layer_color(layer_type))
                patch.set_alpha(0.85)
                patch.set_hatch(hatches.get(phase, ""))
            p50, p99 = np.percentile(values, [50, 99])
            left.plot([p99], [y], marker="D", color="black", markersize=4, zorder=5)
            left.annotate(
                f"{phase}: p50 {_us(p50)} · p99 {_us(p99)} µs",
                xy=(1.01, y),
                xycoords=("axes fraction", "data"),
                fontsize=7.5,
                va="center",
                annotation_clip=False,
            )
    left.set_xscale("log")
    lo, hi = min(d[2] for d in data), max(d[2] for d in data)
    # 1-2-5 ticks over up to two decades, one tick per decade beyond (or the labels collide)
    left.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if hi / lo < 300 else (1.0,)))
    left.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 1 else f"{x:g}"))
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_yticks(
        range(len(types)), [f"{t}\n({sum(len(by_key.get((t, p), [])) for p in phases):,} calls)" for t in types]
    )
    left.set_ylim(-0.6, len(types) - 0.4)
    left.invert_yaxis()
    left.set_xlabel(f"duration per {'block call' if source == 'layer' else source + ' event'} (µs, log scale)")
    left.set_title("latency per layer type: box p25-p75, black line p50, ◆ p99, whiskers p1-p99", fontsize=10)
    left.grid(axis="x", which="major", alpha=0.4)
    left.grid(axis="x", which="minor", alpha=0.12)

    # Right: the timeline of one representative step.
    step, description = _timeline_step(con, run_id, source)
    query = (
        "SELECT layer, coalesce(layer_type, ?), name, start_us, duration_us FROM events "
        "WHERE run_id = ? AND source = ? AND start_us IS NOT NULL AND duration_us IS NOT NULL "
    )
    params: list[Any] = [OTHER, run_id, source]
    if step is not None:
        query += "AND step = ? "
        params.append(step)
    events = con.execute(query + "ORDER BY start_us LIMIT 5000", params).fetchall()
    step_row = None
    if step is not None:
        step_row = con.execute(
            "SELECT start_us, duration_us FROM events WHERE run_id = ? AND source = 'step' AND step = ? LIMIT 1",
            [run_id, step],
        ).fetchone()
    t0 = step_row[0] if step_row else min((e[3] for e in events), default=0.0)
    if source == "layer":  # one lane per block
        lanes = sorted({(e[0], e[1]) for e in events}, key=lambda lane: (lane[0] is None, lane[0] or 0))
        lane_labels = [f"L{index} {layer_type}" for index, layer_type in lanes]
        lane_of = {lane: k for k, lane in enumerate(lanes)}
        lane_key = lambda e: (e[0], e[1])  # noqa: E731
    else:  # one lane per layer type
        lanes = sorted({e[1] for e in events}, key=analysis._type_key)
        lane_labels = list(lanes)
        lane_of = {lane: k for k, lane in enumerate(lanes)}
        lane_key = lambda e: e[1]  # noqa: E731
    span = max((e[3] + e[4] - t0 for e in events), default=0.0)
    if step_row:
        span = max(span, step_row[1])
    scale, unit = (1e3, "ms") if span > 20_000 else (1.0, "µs")
    edge = 0.4 if len(events) <= 200 else 0.0  # outlines would paint thousands of thin kernels black
    for e in events:
        right.barh(
            lane_of[lane_key(e)],
            e[4] / scale,
            left=(e[3] - t0) / scale,
            height=0.7,
            color=layer_color(e[1]),
            edgecolor="black",
            linewidth=edge,
        )
    if step_row:
        right.axvline(0, color="0.4", linestyle="--", linewidth=0.8)
        right.axvline(step_row[1] / scale, color="0.4", linestyle="--", linewidth=0.8)
    fontsize = max(5.0, min(9.0, 360 / max(len(lanes), 1)))
    right.set_yticks(range(len(lanes)), lane_labels, fontsize=fontsize)
    right.set_ylim(len(lanes) - 0.4, -0.8)
    xlabel = f"time since the {'step started' if step_row else 'first event'} ({unit})"
    right.set_xlabel(xlabel + ("; dashed: step start and end" if step_row else ""))
    right.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    right.set_title(f"timeline of {description}", fontsize=10)
    right.grid(axis="x", alpha=0.3)

    shown = sorted({t for t in types} | {e[1] for e in events}, key=analysis._type_key)
    handles = [Patch(facecolor=layer_color(t), edgecolor="black", label=t) for t in shown]
    if len(phases) > 1:
        handles += [Patch(facecolor="white", edgecolor="black", hatch=hatches.get(p, ""), label=p) for p in phases]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), frameon=False, fontsize=9)
    created = f" {run.created_at:%Y-%m-%d %H:%M}" if run.created_at else ""
    title = f"{run.model or 'unnamed model'} · run {run.run_id} · {run.kind or ''}{created}"
    if run.device:
        title += f" · {run.device}"
    title += f" · {len(data):,} {'block calls' if source == 'layer' else source + ' events'}"
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.subplots_adjust(wspace=0.55)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# -- Perfetto ------------------------------------------------------------------------------------------

_ARG_COLUMNS = ("layer", "layer_type", "step", "phase", "batch", "tokens", "rank", "stream", "device_id", "range_name")


def perfetto_events(con: duckdb.DuckDBPyConnection, run_id: str, *, source: str | None = None) -> list[dict]:
    """Chrome trace events: metadata naming the process and one thread (track) per layer type,
    a track of forward steps, and one complete ('X') event per call, ts / dur in µs from the
    run's first event. Kernel traces get a track per (layer type, stream or thread), since calls
    on different streams overlap."""
    run = analysis.run_summary(con, run_id)
    source = analysis.event_source(con, run_id, source)
    columns = ("source", "name", "start_us", "duration_us", *_ARG_COLUMNS)
    rows = con.execute(
        f"SELECT {', '.join(columns)}, tid FROM events WHERE run_id = ? AND source IN (?, 'step') "
        "AND start_us IS NOT NULL AND duration_us IS NOT NULL ORDER BY start_us",
        [run_id, source],
    ).fetchall()
    t0 = min((r[2] for r in rows), default=0.0)
    pid = 1

    def lane(r: tuple) -> tuple:
        if r[0] == "step":
            return ("", "steps")
        layer_type = r[5] or OTHER
        if source == "layer":
            return (layer_type, None)
        return (layer_type, f"stream {r[11]}" if r[11] is not None else f"thread {r[-1]}")

    lanes = sorted({lane(r) for r in rows}, key=lambda k: (k[0] != "", analysis._type_key(k[0]), str(k[1])))
    per_type = {}
    for layer_type, _ in lanes:
        per_type[layer_type] = per_type.get(layer_type, 0) + 1
    tid_of = {key: k + 1 for k, key in enumerate(lanes)}
    trace: list[dict] = [
        {
            "ph": "M",
            "name": "process_name",
            "pid": pid,
            "tid": 0,
            "args": {"name": f"{run.model or 'run'} · {run.run_id} · {source} events"},
        }
    ]
    for key, tid in tid_of.items():
        layer_type, detail = key
        name = (
            "steps" if detail == "steps" else (layer_type if per_type[layer_type] == 1 else f"{layer_type} · {detail}")
        )
        trace.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        trace.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    for r in rows:
        args = {name: value for name, value in zip(_ARG_COLUMNS, r[4:14], strict=True) if value is not None}
        name = f"step {r[6]} ({r[7]})" if r[0] == "step" else (r[1] or "?")
        trace.append(
            {
                "ph": "X",
                "name": name,
                "cat": r[0],
                "pid": pid,
                "tid": tid_of[lane(r)],
                "ts": round(float(r[2] - t0), 3),  # µs to the ns: no float noise in the file
                "dur": float(r[3]),
                "args": args,
            }
        )
    return trace


def write_perfetto(
    con: duckdb.DuckDBPyConnection, run_id: str, path: str | os.PathLike, *, source: str | None = None
) -> Path:
    """Write a Chrome trace event JSON ({"traceEvents": [...]}) that ui.perfetto.dev and
    chrome://tracing open: a track per layer type, a track of steps, args with layer, step,
    phase and tokens."""
    events = perfetto_events(con, run_id, source=source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"run_id": run_id}}, f)
    return path


# -- entry points ----------------------------------------------------------------------------------------


def print_profile_summary(
    con: duckdb.DuckDBPyConnection, run_id: str, *, file: TextIO | None = None, color: bool | None = None
) -> None:
    """The decomposition and MoE imbalance tables of one run, as `hybridlm profile` ends with."""
    file = file or sys.stdout
    color = file.isatty() if color is None else color
    rows = analysis.decomposition(con, run_id)
    imbalance = analysis.moe_imbalance(con, run_id)
    file.write(render_tables(rows, imbalance, run=analysis.run_summary(con, run_id), color=color))


def report_main(
    db: str | os.PathLike,
    run: str | None = None,
    baseline: str | os.PathLike | None = None,
    run2: str | None = None,
    plot: str | os.PathLike | None = None,
    perfetto: str | os.PathLike | None = None,
    as_json: bool = False,
    *,
    source: str | None = None,
    p50_threshold: float = analysis.P50_THRESHOLD,
    p99_threshold: float = analysis.P99_THRESHOLD,
    min_calls: int = analysis.MIN_CALLS,
    min_abs_us: float = analysis.MIN_ABS_US,
    p99_min_abs_us: float = analysis.P99_MIN_ABS_US,
    min_calls_p99: int = analysis.MIN_CALLS_P99,
    file: TextIO | None = None,
) -> int:
    """`hybridlm report`: print tables (or JSON) for run `run` of `db` (default: its latest run),
    write the PNG / Perfetto files asked for, and compare against run `run2` of `baseline` (its
    latest run by default; `run2` without `baseline` means a run of `db` itself).

    Returns 1 when the comparison flags a regression, else 0. A TraceError (unknown run, not a
    trace file) propagates; the command line prints it.
    """
    file = file or sys.stdout
    con = open_readonly(db)
    con_base = None
    try:
        run_id = analysis.resolve_run(con, run)
        summary = analysis.run_summary(con, run_id)
        rows = analysis.decomposition(con, run_id, source=source)
        imbalance = analysis.moe_imbalance(con, run_id)
        changes = None
        extra: dict[str, Any] = {}
        if baseline is not None or run2 is not None:
            con_base = open_readonly(baseline) if baseline is not None else con
            base_id = analysis.resolve_run(con_base, run2)
            changes = analysis.compare_runs(
                con_base,
                base_id,
                con,
                run_id,
                p50_threshold,
                p99_threshold,
                min_calls=min_calls,
                min_abs_us=min_abs_us,
                p99_min_abs_us=p99_min_abs_us,
                min_calls_p99=min_calls_p99,
                source=source,
            )
            extra["baseline"] = {"db": str(baseline if baseline is not None else db), "run_id": base_id}
            extra["thresholds"] = {
                "p50_threshold": p50_threshold,
                "p99_threshold": p99_threshold,
                "min_calls": min_calls,
                "min_abs_us": min_abs_us,
                "p99_min_abs_us": p99_min_abs_us,
                "min_calls_p99": min_calls_p99,
            }
        written = {}
        if plot is not None:
            written["plot"] = str(write_plot(con, run_id, plot, source=source))
        if perfetto is not None:
            written["perfetto"] = str(write_perfetto(con, run_id, perfetto, source=source))
        if as_json:
            file.write(to_json(rows, imbalance, changes, run=summary, extra={**extra, "files": written}) + "\n")
        else:
            title = "baseline vs candidate (µs)"
            if changes is not None:
                title = (
                    f"baseline {extra['baseline']['run_id']} ({extra['baseline']['db']}) vs candidate {run_id} (µs); "
                    f"flagged: p50 > +{p50_threshold:.0%} and > +{min_abs_us:,.0f} µs ({min_calls}+ calls), "
                    f"or p99 > +{p99_threshold:.0%} and > +{p99_min_abs_us:,.0f} µs ({min_calls_p99}+ calls)"
                )
            text = render_tables(rows, imbalance, changes, run=summary, comparison_title=title, color=file.isatty())
            file.write(text)
            for kind, written_path in written.items():
                file.write(f"wrote {kind}: {written_path}\n")
        return 1 if changes is not None and any(c.is_regression for c in changes) else 0
    finally:
        if con_base is not None and con_base is not con:
            con_base.close()
        con.close()
