"""`hybridlm report` and the summary `hybridlm profile` ends with."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

import duckdb

from hybridlm.trace import analysis
from hybridlm.trace.analysis import ALL_LAYERS, Change
from hybridlm.trace.imbalance import moe_imbalance
from hybridlm.trace.report.json_doc import to_json
from hybridlm.trace.report.perfetto import write_perfetto
from hybridlm.trace.report.plot import plot_format, write_plot
from hybridlm.trace.report.ranks import rank_report
from hybridlm.trace.report.tables import completeness, render_tables
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import open_readonly


def _decomposition(con: duckdb.DuckDBPyConnection, run_id: str, source: str | None) -> list:
    """The decomposition, or no rows for a run with nothing to decompose (empty, or killed early)."""
    if analysis.decomposable_source(con, run_id, source) is None:
        return []
    return analysis.decomposition(con, run_id, source=source)


def print_profile_summary(
    con: duckdb.DuckDBPyConnection, run_id: str, *, file: TextIO | None = None, color: bool | None = None
) -> None:
    """The decomposition and MoE imbalance tables of one run (and its ranks, for an expert-parallel
    run), as `hybridlm profile` ends with."""
    file = file or sys.stdout
    color = file.isatty() if color is None else color
    rows = _decomposition(con, run_id, None)
    imbalance = moe_imbalance(con, run_id)
    ranks = rank_report(con, run_id)
    file.write(render_tables(rows, imbalance, run=analysis.run_summary(con, run_id), ranks=ranks, color=color))


def _describe(model: str | None, pattern: str | None) -> str:
    return f"{model or 'unnamed model'}" + (f" (pattern {pattern})" if pattern else "")


def common_layer_types(
    changes: list[Change], identity_a: tuple, identity_b: tuple, base_id: str, run_id: str, warn: TextIO
) -> list[Change]:
    """Runs of different models or patterns: warn, and keep only the layer types both runs have
    (an aggregate over different blocks compares nothing, so it goes too). Same model: as given."""
    if identity_a == identity_b:
        return changes
    types_a = {c.layer_type for c in changes if c.layer_type != ALL_LAYERS and c.calls_a > 0}
    types_b = {c.layer_type for c in changes if c.layer_type != ALL_LAYERS and c.calls_b > 0}
    only = {t: "baseline" for t in types_a - types_b} | {t: "candidate" for t in types_b - types_a}
    kept = [c for c in changes if c.layer_type in types_a & types_b]
    shared = sorted(types_a & types_b, key=analysis.type_key)
    left_out = ", ".join(f"{t} ({only[t]} only)" for t in sorted(only, key=analysis.type_key)) or "none"
    warn.write(
        f"hybridlm report: warning: baseline run {base_id} is {_describe(*identity_a)} but candidate run {run_id} "
        f"is {_describe(*identity_b)}; comparing only the layer types both have: {', '.join(shared) or 'none'}; "
        f"left out: {left_out}\n"
    )
    return kept


def _check_output(path: str | os.PathLike, inputs: list[str | os.PathLike], what: str) -> None:
    target = Path(path).resolve()
    for db in inputs:
        if Path(db).resolve() == target:
            raise TraceError(f"--{what} {path}: is the trace database being read; choose another file name")
    if target.is_dir():
        raise TraceError(f"--{what} {path}: is a directory; give a file name")
    # Replace only a file of the kind this option writes (a previous report's output), never the user's others.
    if target.is_file() and target.stat().st_size and not _is_own_output(target, what):
        kind = "a Perfetto/Chrome trace JSON" if what == "perfetto" else f"a {plot_format(path).upper()} image"
        raise TraceError(f"--{what} {path}: exists and is not {kind}; remove it or choose another file name")


# The first bytes of the files `report` writes: PNG, PDF and SVG images, and Chrome trace-event JSON.
_IMAGE_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "pdf": (b"%PDF-",), "svg": (b"<?xml", b"<svg")}


def _is_own_output(path: Path, what: str) -> bool:
    with path.open("rb") as handle:
        head = handle.read(512)
    if what == "perfetto":
        return head.lstrip().startswith(b"{") and b'"traceEvents"' in head
    return head.startswith(_IMAGE_MAGIC[plot_format(path)])


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
    warn: TextIO | None = None,
) -> int:
    """`hybridlm report`: print tables (or JSON) for run `run` of `db` (default: its latest run),
    write the plot / Perfetto files asked for (to exactly the paths given, which are printed), and
    compare against run `run2` of `baseline` (its latest run by default; `run2` without `baseline`
    means a run of `db` itself).

    A run killed before its end is marked INCOMPLETE with the steps it holds; a run without events
    prints its run line only. A baseline of another model or pattern is compared on the layer types
    both have, with a warning on `warn` (stderr). Returns 1 when the comparison flags a regression,
    else 0. A TraceError (unknown run, not a trace file, a bad output path) propagates; the command
    line prints it.
    """
    file = file or sys.stdout
    warn = warn or sys.stderr
    inputs = [db] + ([baseline] if baseline is not None else [])
    if plot is not None:
        _check_output(plot, inputs, "plot")
        plot_format(plot)  # an unknown suffix is refused before any work
    if perfetto is not None:
        _check_output(perfetto, inputs, "perfetto")
    con = open_readonly(db)
    con_base = None
    try:
        run_id = analysis.resolve_run(con, run)
        summary = analysis.run_summary(con, run_id)
        rows = _decomposition(con, run_id, source)
        rules = analysis.attribution_rules(con, run_id, source)
        imbalance = moe_imbalance(con, run_id)
        ranks = rank_report(con, run_id)
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
            identity_a, identity_b = analysis.run_identity(con_base, base_id), analysis.run_identity(con, run_id)
            changes = common_layer_types(changes, identity_a, identity_b, base_id, run_id, warn)
            base_summary = analysis.run_summary(con_base, base_id)
            if (note := completeness(base_summary)) is not None:
                warn.write(f"hybridlm report: warning: baseline run {base_id}: {note}\n")
            extra["baseline"] = {
                "db": str(baseline if baseline is not None else db),
                "run_id": base_id,
                "complete": base_summary.is_complete,
                "same_model": identity_a == identity_b,
            }
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
            doc = to_json(
                rows, imbalance, changes, run=summary, rules=rules, ranks=ranks, extra={**extra, "files": written}
            )
            file.write(doc + "\n")
        else:
            title = "baseline vs candidate (µs)"
            if changes is not None:
                title = (
                    f"baseline {extra['baseline']['run_id']} ({extra['baseline']['db']}) vs candidate {run_id} (µs); "
                    f"flagged: p50 > +{p50_threshold:.0%} and > +{min_abs_us:,.0f} µs ({min_calls}+ calls), "
                    f"or p99 > +{p99_threshold:.0%} and > +{p99_min_abs_us:,.0f} µs ({min_calls_p99}+ calls)"
                )
            text = render_tables(
                rows,
                imbalance,
                changes,
                run=summary,
                rules=rules,
                ranks=ranks,
                comparison_title=title,
                color=file.isatty(),
            )
            file.write(text)
            for kind, written_path in written.items():
                file.write(f"wrote {kind}: {written_path}\n")
        return 1 if changes is not None and any(c.is_regression for c in changes) else 0
    finally:
        if con_base is not None and con_base is not con:
            con_base.close()
        con.close()
