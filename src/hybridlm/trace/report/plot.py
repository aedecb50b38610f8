"""The report as a figure: left, the latency distribution of each layer type per phase; right, the
timeline of one representative step. `build_figure` returns the matplotlib Figure (its artists
carry gids, e.g. 'box:moe:decode', so a test can read back what is drawn); `write_plot` saves it.

What a box shows, exactly as its caption says: the box spans p25-p75, the black line is p50, the
whiskers end at p1 and p99 and the ◆ sits on p99, dots are the calls below p1 or above p99. The
percentiles are numpy's linear interpolation, the same as DuckDB's quantile_cont, which the tables
use. (matplotlib's own `boxplot(whis=(1, 99))` ends a whisker at the last *data point* inside the
percentile, not at the percentile, so a ◆ at p99 would float beyond its whisker: the boxes are
drawn with `bxp` from these statistics instead.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from hybridlm.trace import analysis
from hybridlm.trace.analysis import ALL_PHASES, OTHER
from hybridlm.trace.report.formats import us, write_staged
from hybridlm.trace.schema import LAYER_TYPES, TraceError

# One colour per layer type, the same in every panel and plot: matplotlib's tab10 hues, given out
# in the order of schema.LAYER_TYPES (the block registry's, then moe_a2a and comm), so a new block
# type gets its colour without an edit here.
_TAB10 = ("#1f77b4", "#2ca02c", "#d62728", "#17becf", "#7f7f7f", "#ff7f0e", "#8c564b", "#9467bd", "#e377c2")
_SPARE_COLORS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")
LAYER_COLORS = {
    **{t: (_TAB10 + _SPARE_COLORS)[i % (len(_TAB10) + len(_SPARE_COLORS))] for i, t in enumerate(LAYER_TYPES)},
    OTHER: "#bcbd22",
}
PERCENTILES = (1, 25, 50, 75, 99)  # whisker end, box, median, box, whisker end
CAPTION = "box p25-p75, black line p50, whiskers p1 to p99 (◆ p99), dots: calls below p1 or above p99"
_HATCHES = {"prefill": "///", "train": "..."}


def layer_color(layer_type: str) -> str:
    if layer_type in LAYER_COLORS:
        return LAYER_COLORS[layer_type]
    return _SPARE_COLORS[sum(map(ord, layer_type)) % len(_SPARE_COLORS)]  # stable across runs


def box_stats(values: np.ndarray) -> dict[str, Any]:
    """The statistics one box draws (see the module docstring), in `Axes.bxp`'s keys."""
    p1, p25, p50, p75, p99 = np.percentile(values, PERCENTILES)
    fliers = values[(values < p1) | (values > p99)]
    return {"whislo": p1, "q1": p25, "med": p50, "q3": p75, "whishi": p99, "fliers": fliers}


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
            return step, f"{step_phase} step {step}: the median of {len(steps)} {phase or 'step'}s ({us(duration)} µs)"
    spans = con.execute(
        "SELECT step, max(start_us + duration_us) - min(start_us) AS span FROM events "
        "WHERE run_id = ? AND source = ? AND step IS NOT NULL GROUP BY step ORDER BY span, step",
        [run_id, source],
    ).fetchall()
    if spans:
        step, span = spans[(len(spans) - 1) // 2]
        return step, f"step {step}: the median span of {len(spans)} steps ({us(span)} µs)"
    return None, "the first events of the run (no steps recorded)"


def _latency_panel(axes, by_key: dict[tuple[str, str], np.ndarray], types: list[str], phases: list[str]) -> None:
    """One row per layer type, one box per phase inside it."""
    import matplotlib

    height = 0.8 / len(phases)
    # bxp's `orientation` exists from matplotlib 3.10; `vert` is deprecated from 3.11
    version = tuple(int(part) for part in matplotlib.__version__.split(".")[:2])
    orientation = {"orientation": "horizontal"} if version >= (3, 10) else {"vert": False}
    for i, layer_type in enumerate(types):
        for j, phase in enumerate(phases):
            values = by_key.get((layer_type, phase))
            if values is None:
                continue
            y = i + (j - (len(phases) - 1) / 2) * height
            stats = box_stats(values)
            parts = axes.bxp(
                [stats],
                positions=[y],
                widths=height * 0.8,
                **orientation,
                patch_artist=True,
                showfliers=True,
                manage_ticks=False,
                flierprops={"marker": ".", "markersize": 2, "alpha": 0.4, "markeredgecolor": "0.3"},
                medianprops={"color": "black", "linewidth": 1.8},
            )
            key = f"{layer_type}:{phase}"
            for name, artists in parts.items():
                for artist in artists:
                    artist.set_gid(f"{name}:{key}")  # 'boxes:moe:decode', 'whiskers:...', 'medians:...'
            for patch in parts["boxes"]:
                patch.set_facecolor(layer_color(layer_type))
                patch.set_alpha(0.85)
                patch.set_hatch(_HATCHES.get(phase, ""))
            axes.plot([stats["whishi"]], [y], marker="D", color="black", markersize=4, zorder=5, gid=f"p99:{key}")
            axes.annotate(
                f"{phase}: p50 {us(stats['med'])} · p99 {us(stats['whishi'])} µs",
                xy=(1.01, y),
                xycoords=("axes fraction", "data"),
                fontsize=7.5,
                va="center",
                annotation_clip=False,
                gid=f"label:{key}",
            )


def build_figure(con: duckdb.DuckDBPyConnection, run_id: str, *, source: str | None = None):
    """The report figure of one run (a matplotlib Figure, not yet saved); see the module docstring."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switch
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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
    lists: dict[tuple[str, str], list[float]] = {}
    for layer_type, phase, duration in data:
        lists.setdefault((layer_type, phase or no_phase), []).append(duration)
    by_key = {key: np.asarray(values, dtype=np.float64) for key, values in lists.items()}
    types = sorted({k[0] for k in by_key}, key=analysis.type_key)
    phases = sorted({k[1] for k in by_key}, key=analysis.phase_key)

    fig = Figure(figsize=(16, 7.5))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    _latency_panel(left, by_key, types, phases)
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
    left.set_title(f"latency per layer type: {CAPTION}", fontsize=9)
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
        lanes = sorted({e[1] for e in events}, key=analysis.type_key)
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
            gid=f"bar:{e[1]}",
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

    shown = sorted({t for t in types} | {e[1] for e in events}, key=analysis.type_key)
    handles = [Patch(facecolor=layer_color(t), edgecolor="black", label=t) for t in shown]
    if len(phases) > 1:
        handles += [Patch(facecolor="white", edgecolor="black", hatch=_HATCHES.get(p, ""), label=p) for p in phases]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), frameon=False, fontsize=9)
    created = f" {run.created_at:%Y-%m-%d %H:%M}" if run.created_at else ""
    title = f"{run.model or 'unnamed model'} · run {run.run_id} · {run.kind or ''}{created}"
    if run.device:
        title += f" · {run.device}"
    title += f" · {len(data):,} {'block calls' if source == 'layer' else source + ' events'}"
    if run.is_complete is False:
        title += " · INCOMPLETE run"
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.subplots_adjust(wspace=0.55)
    return fig


# Formats matplotlib writes, by file suffix; a path without a suffix gets a PNG under exactly that name.
PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format(path: str | os.PathLike) -> str:
    """The image format for `path`: its suffix (png, pdf, svg), PNG without one; ValueError otherwise."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    if suffix not in PLOT_FORMATS:
        raise TraceError(
            f"{path}: cannot write a plot as .{suffix}; use one of {', '.join('.' + f for f in PLOT_FORMATS)} "
            "(or no suffix for a PNG)"
        )
    return suffix


def write_plot(
    con: duckdb.DuckDBPyConnection, run_id: str, path: str | os.PathLike, *, source: str | None = None
) -> Path:
    """Save `build_figure` to exactly `path` (format from its suffix, PNG without one); returns `path`.

    Staged beside `path` and moved into place: a failed plot leaves the user's file as it was."""
    image_format = plot_format(path)
    fig = build_figure(con, run_id, source=source)
    return write_staged(path, lambda staging: fig.savefig(staging, dpi=110, format=image_format))
