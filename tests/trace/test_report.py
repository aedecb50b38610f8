"""Reports on real traces: tables, JSON, Perfetto JSON and the PNG, checked against the database rows."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter

import pytest

from hybridlm.cli import main as cli_main
from hybridlm.trace import analysis, report
from hybridlm.trace.analysis import ALL_LAYERS
from hybridlm.trace.importers import import_trace
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import TraceStore, open_readonly
from tests.trace.test_analysis import KINETO, MOE_PATTERN, record_run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A closed trace file with two runs of the MoE-heavy pattern (the second is the latest)."""
    path = tmp_path_factory.mktemp("report") / "trace.duckdb"
    with TraceStore(path) as store:
        first = record_run(store, MOE_PATTERN, num_requests=2, new_tokens=10)
        second = record_run(store, MOE_PATTERN, num_requests=2, new_tokens=10)
    return path, first, second


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "kineto.duckdb"
    with TraceStore(path) as store:
        run_id = import_trace(KINETO, store)
    return path, run_id


def cells(line: str) -> list[str]:
    return line.split()


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x%"))


def test_tables_show_every_row_per_phase_with_the_aggregate_set_apart(recorded):
    path, _, run_id = recorded
    con = open_readonly(path)
    rows = analysis.decomposition(con, run_id)
    imbalance = analysis.moe_imbalance(con, run_id)
    text = report.render_tables(rows, imbalance, run=analysis.run_summary(con, run_id))
    con.close()
    lines = text.splitlines()
    assert lines[0].startswith(f"run {run_id} · debug-tiny {MOE_PATTERN}")
    for phase in ("prefill", "decode", "all"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"phase {phase}: wall time"))
        header = lines[start + 2]
        assert cells(header)[:2] == ["layer", "type"] and "tail ratio p99/p50" in header
        for row in (r for r in rows if r.phase == phase):
            label = "all layers (aggregate)" if row.is_aggregate else row.layer_type
            i = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(label))
            values = cells(lines[i].strip()[len(label) :])
            assert number(values[0]) == row.calls
            assert number(values[1]) == pytest.approx(row.p50_us, rel=0.01, abs=0.06)
            assert number(values[2]) == pytest.approx(row.p99_us, rel=0.01, abs=0.06)
            assert number(values[3]) == pytest.approx(row.tail_ratio, rel=0.005, abs=0.006)
            assert number(values[4]) == pytest.approx(100 * row.share_of_wall, abs=0.06)
            if row.is_aggregate:
                assert lines[i - 1].strip() == ""  # a section break sets the aggregate apart
    # the imbalance table: one line per (MoE layer, phase)
    moe_lines = [line for line in lines if line.strip().startswith("L") and ("prefill" in line or "decode" in line)]
    assert len(moe_lines) == len(imbalance) == 2 * MOE_PATTERN.count("E")
    for line, row in zip(moe_lines, imbalance, strict=True):
        values = cells(line)
        assert values[:2] == [f"L{row.layer}", row.phase]
        assert number(values[5]) == pytest.approx(row.p50, abs=0.006)


def test_change_table_and_json_mark_flagged_rows(recorded):
    path, first, second = recorded
    con = open_readonly(path)
    # thresholds far below zero flag every layer type with enough calls: the marking is tested here, not the gate
    changes = analysis.compare_runs(
        con, first, con, second, -10.0, -10.0, min_abs_us=-math.inf, p99_min_abs_us=-math.inf
    )
    rows = analysis.decomposition(con, second)
    imbalance = analysis.moe_imbalance(con, second)
    con.close()
    flagged = {(c.layer_type, c.phase) for c in changes if c.is_regression}
    enough_calls = {(c.layer_type, c.phase) for c in changes if c.layer_type != ALL_LAYERS and c.calls_a >= 20}
    assert flagged == enough_calls and ("moe", "decode") in flagged  # not the 2 prefill calls of attention
    assert not any(c.layer_type == ALL_LAYERS for c in changes if c.is_regression)
    text = report.render_tables(rows, imbalance, changes)
    change_lines = [line for line in text.splitlines() if "REGRESSION" in line]
    assert len(change_lines) == len(flagged)
    assert all(line.lstrip().startswith("!!") for line in change_lines)
    assert f"{len(flagged)} regressions" in text

    doc = json.loads(report.to_json(rows, imbalance, changes))
    assert doc["source"] == "layer"
    assert len(doc["decomposition"]) == len(rows)
    for entry, row in zip(doc["decomposition"], rows, strict=True):
        assert (entry["layer_type"], entry["phase"], entry["calls"]) == (row.layer_type, row.phase, row.calls)
        assert entry["p99_us"] == row.p99_us and entry["is_aggregate"] == row.is_aggregate
    assert [(e["layer"], e["phase"], e["p50"]) for e in doc["moe_imbalance"]] == [
        (r.layer, r.phase, r.p50) for r in imbalance
    ]
    assert set(doc["comparison"]["regressions"]) == {f"{t}/{p}" for t, p in flagged}


def thread_names(trace: list[dict]) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace if e["ph"] == "M" and e["name"] == "thread_name"}


def test_perfetto_trace_has_a_track_per_layer_type_holding_every_call(recorded, tmp_path):
    path, _, run_id = recorded
    con = open_readonly(path)
    out = report.write_perfetto(con, run_id, tmp_path / "trace.json")
    db_rows = con.execute(
        "SELECT source, coalesce(layer_type, 'steps'), duration_us, start_us, layer, step, phase, tokens "
        "FROM events WHERE run_id = ?",
        [run_id],
    ).fetchall()
    con.close()
    trace = json.loads(out.read_text())["traceEvents"]
    assert {e["ph"] for e in trace} == {"M", "X"}
    assert next(e["args"]["name"] for e in trace if e["name"] == "process_name").startswith("debug-tiny")
    names = thread_names(trace)
    assert sorted(names.values()) == sorted({"steps", "mamba2", "moe", "attention", "gdn"})
    complete = [e for e in trace if e["ph"] == "X"]
    assert len(complete) == len(db_rows)
    for e in complete:
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], float) and isinstance(e["dur"], float) and e["ts"] >= 0
    by_track: dict[str, list[float]] = {}
    for e in complete:
        by_track.setdefault(names[e["tid"]], []).append(e["dur"])
    expected: dict[str, list[float]] = {}
    for _, track, duration, *_ in db_rows:
        expected.setdefault(track, []).append(duration)
    assert {k: sorted(v) for k, v in by_track.items()} == {k: sorted(v) for k, v in expected.items()}
    # args carry layer, step, phase and tokens; ts is start_us from the run's first event
    t0 = min(r[3] for r in db_rows)
    by_layer_step = {(r[4], r[5]): r for r in db_rows if r[0] == "layer"}
    for e in complete:
        if e["cat"] == "layer":
            row = by_layer_step[(e["args"]["layer"], e["args"]["step"])]
            assert (e["args"]["phase"], e["args"]["tokens"], e["dur"]) == (row[6], row[7], row[2])
            assert e["ts"] == pytest.approx(row[3] - t0, abs=1e-3)


def test_perfetto_trace_of_an_imported_run_has_kernels_by_layer_type(imported, tmp_path):
    path, run_id = imported
    con = open_readonly(path)
    out = report.write_perfetto(con, run_id, tmp_path / "kineto.json")
    expected = Counter(
        dict(
            con.execute(
                "SELECT coalesce(layer_type, 'other'), count(*) FROM events WHERE run_id = ? AND source = 'cuda' "
                "GROUP BY 1",
                [run_id],
            ).fetchall()
        )
    )
    con.close()
    trace = json.loads(out.read_text())["traceEvents"]
    names = thread_names(trace)
    counts = Counter(names[e["tid"]].split(" · ")[0] for e in trace if e["ph"] == "X")
    assert counts == expected  # moe_a2a, comm, other; a track per stream within each
    assert all(e["cat"] == "cuda" for e in trace if e["ph"] == "X")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_pngs_of_a_legible_size(recorded, imported, tmp_path):
    for db, run_id in ((recorded[0], recorded[2]), imported):
        con = open_readonly(db)
        out = report.write_plot(con, run_id, tmp_path / f"{run_id}.png")
        con.close()
        width, height = png_size(out)
        assert width >= 1500 and height >= 700
        assert out.stat().st_size > 40_000  # two panels of content, not an empty canvas


def test_report_main_prints_writes_and_compares(recorded, tmp_path, capsys):
    path, first, second = recorded
    plot, trace = tmp_path / "out.png", tmp_path / "out.json"
    assert report.report_main(path, plot=plot, perfetto=trace) == 0
    out = capsys.readouterr().out
    assert f"run {second}" in out and "phase decode" in out and "MoE expert imbalance" in out
    assert f"wrote plot: {plot}" in out and png_size(plot)[0] > 0 and json.loads(trace.read_text())["traceEvents"]

    # a run compared with itself, through --run2 without --baseline (a run of the same file)
    assert report.report_main(path, run=first, run2=first, as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["run_id"] == first and doc["baseline"]["run_id"] == first
    assert doc["comparison"]["regressions"] == [] and doc["thresholds"]["p50_threshold"] == analysis.P50_THRESHOLD

    with pytest.raises(TraceError, match=f"no run 'nope'.*{first}"):
        report.report_main(path, run="nope")
    # the command line as the lead wired it: a TraceError is exit status 2 with the message
    assert cli_main(["report", str(path), "--run", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert cli_main(["report", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["run_id"] == second


def test_profile_summary_prints_the_same_tables(recorded, capsys):
    path, _, run_id = recorded
    con = open_readonly(path)
    report.print_profile_summary(con, run_id)
    expected = report.render_tables(
        analysis.decomposition(con, run_id), analysis.moe_imbalance(con, run_id), run=analysis.run_summary(con, run_id)
    )
    con.close()
    assert capsys.readouterr().out == expected
