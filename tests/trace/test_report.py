"""Reports on real traces: tables, JSON, Perfetto JSON and the PNG, checked against the database rows."""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter

import duckdb
import numpy as np
import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.cli import main as cli_main
from hybridlm.trace import analysis, report
from hybridlm.trace.analysis import ALL_LAYERS
from hybridlm.trace.imbalance import moe_imbalance
from hybridlm.trace.importers import import_trace
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import TraceStore, open_readonly
from tests.helpers import tiny_config
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


def numpy_decomposition(path, run_id: str) -> dict[tuple[str, str], tuple[int, float, float]]:
    """{(layer type or 'all layers', phase or 'all'): (calls, p50, p99)} from the raw block rows,
    pulled with plain SQL through a plain DuckDB connection and reduced with numpy."""
    con = duckdb.connect(str(path), read_only=True)
    raw = con.execute(
        "SELECT layer_type, phase, duration_us FROM events WHERE run_id = ? AND source = 'layer'", [run_id]
    ).fetchall()
    con.close()
    groups: dict[tuple[str, str], list[float]] = {}
    for layer_type, phase, duration in raw:
        for key in ((layer_type, phase), (layer_type, "all"), (ALL_LAYERS, phase), (ALL_LAYERS, "all")):
            groups.setdefault(key, []).append(duration)
    return {k: (len(v), *np.percentile(v, [50, 99])) for k, v in groups.items()}


def check_printed_decomposition(text: str, expected: dict) -> None:
    """Every (layer type, phase) row printed once, with the numbers numpy gives (to the printed digits)."""
    lines = text.splitlines()
    seen = set()
    for phase in ("prefill", "decode", "all"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"phase {phase}: wall time"))
        header = lines[start + 2]
        assert cells(header)[:2] == ["layer", "type"] and "tail ratio p99/p50" in header
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("phase ")), len(lines))
        for (layer_type, row_phase), (calls, p50, p99) in expected.items():
            if row_phase != phase:
                continue
            label = "all layers (aggregate)" if layer_type == ALL_LAYERS else layer_type
            i = next(i for i in range(start, end) if lines[i].strip().startswith(label + " "))
            values = cells(lines[i].strip()[len(label) :])
            assert number(values[0]) == calls
            assert number(values[1]) == pytest.approx(p50, rel=0.01, abs=0.06)
            assert number(values[2]) == pytest.approx(p99, rel=0.01, abs=0.06)
            assert number(values[3]) == pytest.approx(p99 / p50, rel=0.01, abs=0.006)
            if layer_type == ALL_LAYERS:
                assert lines[i - 1].strip() == ""  # a section break sets the aggregate apart
            seen.add((layer_type, row_phase))
    assert seen == set(expected)


def test_tables_show_every_row_per_phase_with_the_aggregate_set_apart(recorded):
    path, _, run_id = recorded
    con = open_readonly(path)
    rows = analysis.decomposition(con, run_id)
    imbalance = moe_imbalance(con, run_id)
    text = report.render_tables(rows, imbalance, run=analysis.run_summary(con, run_id))
    con.close()
    lines = text.splitlines()
    assert lines[0].startswith(f"run {run_id} · debug-tiny {MOE_PATTERN}")
    assert "INCOMPLETE" not in lines[0]
    check_printed_decomposition(text, numpy_decomposition(path, run_id))
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
    imbalance = moe_imbalance(con, second)
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


def sql_distributions(path, run_id: str, source: str) -> dict[str, tuple[list[float], list[float]]]:
    """{'layer_type:phase': ([p1, p25, p50, p75, p99] by DuckDB's quantile_cont, durations)} from plain SQL."""
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute(
        "SELECT coalesce(layer_type, 'other') || ':' || coalesce(phase, 'all'), "
        "quantile_cont(duration_us, [0.01, 0.25, 0.5, 0.75, 0.99]), list(duration_us) FROM events "
        "WHERE run_id = ? AND source = ? AND duration_us > 0 GROUP BY ALL",
        [run_id, source],
    ).fetchall()
    con.close()
    return {key: (quantiles, durations) for key, quantiles, durations in rows}


def artists(axes, prefix: str) -> dict[str, list]:
    """{'layer_type:phase': [artists]} of the artists whose gid is 'prefix:layer_type:phase'."""
    found: dict[str, list] = {}
    for artist in axes.get_children():
        gid = artist.get_gid() or ""
        if gid.startswith(prefix + ":"):
            found.setdefault(gid[len(prefix) + 1 :], []).append(artist)
    return found


@pytest.mark.parametrize("which", ["recorded", "imported"])
def test_plot_draws_the_stored_distributions_as_its_caption_says(which, recorded, imported):
    path, run_id = (recorded[0], recorded[2]) if which == "recorded" else imported
    source = "layer" if which == "recorded" else "cuda"
    expected = sql_distributions(path, run_id, source)
    con = open_readonly(path)
    fig = report.build_figure(con, run_id)
    con.close()
    left, right = fig.axes[:2]
    title = left.get_title()
    assert "box p25-p75" in title and "line p50" in title and "whiskers p1 to p99 (◆ p99)" in title
    assert "dots: calls below p1 or above p99" in title
    boxes, medians, whiskers = artists(left, "boxes"), artists(left, "medians"), artists(left, "whiskers")
    diamonds, fliers, labels = artists(left, "p99"), artists(left, "fliers"), artists(left, "label")
    assert set(boxes) == set(expected)  # one box per (layer type, phase) the rows hold
    for key, ((p1, p25, p50, p75, p99), durations) in expected.items():
        box_x = boxes[key][0].get_path().vertices[:, 0]
        assert (box_x.min(), box_x.max()) == pytest.approx((p25, p75), rel=1e-9)
        assert list(medians[key][0].get_xdata()) == pytest.approx([p50, p50], rel=1e-9)
        ends = np.concatenate([w.get_xdata() for w in whiskers[key]])
        assert (ends.min(), ends.max()) == pytest.approx((p1, p99), rel=1e-9)  # whisker ends: p1 and p99
        assert list(diamonds[key][0].get_xdata()) == pytest.approx([p99], rel=1e-9)  # the ◆ on the whisker end
        beyond = sorted(d for d in durations if d < p1 or d > p99)
        assert sorted(fliers[key][0].get_xdata()) == pytest.approx(beyond, rel=1e-9)
        p50_text, p99_text = re.search(r"p50 ([\d,.]+) · p99 ([\d,.]+) µs", labels[key][0].get_text()).groups()
        assert (number(p50_text), number(p99_text)) == pytest.approx((p50, p99), rel=0.01, abs=0.006)
    # the timeline: one bar per event of the step it names, as long as the event
    step = int(re.search(r"step (\d+)", right.get_title()).group(1))
    con = duckdb.connect(str(path), read_only=True)
    durations = [
        d
        for (d,) in con.execute(
            "SELECT duration_us FROM events WHERE run_id = ? AND source = ? AND step = ? AND start_us IS NOT NULL",
            [run_id, source, step],
        ).fetchall()
    ]
    con.close()
    scale = 1e3 if "(ms)" in right.get_xlabel() else 1.0
    bars = [a for a in right.patches if (a.get_gid() or "").startswith("bar:")]
    assert sorted(b.get_width() * scale for b in bars) == pytest.approx(sorted(durations)[:5000], rel=1e-9)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_is_written_to_exactly_the_path_printed(recorded, tmp_path, capsys):
    path = recorded[0]
    for name in ("latency", "latency.png", "sub/dir/latency.svg"):
        out = tmp_path / name
        assert report.report_main(path, plot=out) == 0
        assert f"wrote plot: {out}\n" in capsys.readouterr().out
        assert out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency", "latency.png", "sub"]  # no 'latency.png' added
    assert png_size(tmp_path / "latency")[0] >= 1500  # no suffix: a PNG under exactly that name
    assert (tmp_path / "sub/dir/latency.svg").read_text().lstrip().startswith("<?xml")
    before = path.read_bytes()
    with pytest.raises(TraceError, match="is the trace database being read"):
        report.report_main(path, plot=path)
    with pytest.raises(TraceError, match=r"cannot write a plot as \.txt"):
        report.report_main(path, plot=tmp_path / "plot.txt")
    assert path.read_bytes() == before and not (tmp_path / "plot.txt").exists()


def test_plot_and_perfetto_replace_only_their_own_earlier_output(recorded, tmp_path, capsys):
    """Re-running a report over its own PNG / trace JSON is the normal loop; a user's other file in the way
    (a checkpoint's config.json, notes without a suffix) is refused, untouched."""
    path = recorded[0]
    plot, trace = tmp_path / "plot", tmp_path / "trace.json"
    for _ in range(2):
        assert report.report_main(path, plot=plot, perfetto=trace) == 0
    capsys.readouterr()
    assert png_size(plot)[0] > 0 and "traceEvents" in json.loads(trace.read_text())
    config, notes = tmp_path / "config.json", tmp_path / "notes"
    config.write_text('{"model_type": "nemotron_h"}')
    notes.write_text("my notes")
    with pytest.raises(TraceError, match=r"config\.json: exists and is not a Perfetto/Chrome trace JSON"):
        report.report_main(path, perfetto=config)
    with pytest.raises(TraceError, match="notes: exists and is not a PNG image"):
        report.report_main(path, plot=notes)
    assert config.read_text() == '{"model_type": "nemotron_h"}' and notes.read_text() == "my notes"


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


def test_profile_summary_prints_the_numbers_numpy_gives(recorded, capsys):
    path, _, run_id = recorded
    con = open_readonly(path)
    report.print_profile_summary(con, run_id)
    con.close()
    check_printed_decomposition(capsys.readouterr().out, numpy_decomposition(path, run_id))


def test_an_empty_run_never_breaks_a_plain_report(tmp_path, capsys):
    path = tmp_path / "empty.duckdb"
    with TraceStore(path) as store:
        killed = store.new_run(model="debug-tiny")  # never ended: a process killed before its first flush
        ended = store.new_run(model="debug-tiny")
        store.end_run(ended)
    assert report.report_main(path, run=killed) == 0
    out = capsys.readouterr().out
    assert f"run {killed} holds no events to decompose" in out
    assert "INCOMPLETE: no end recorded (killed or interrupted); holds 0 steps, 0 events" in out
    assert cli_main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"run {ended} holds no events" in out and "INCOMPLETE" not in out
    assert cli_main(["report", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["run"]["complete"], doc["decomposition"], doc["source"]) == (True, [], None)


def test_an_interrupted_run_is_marked_incomplete_with_the_steps_it_holds(tmp_path, capsys):
    path = tmp_path / "interrupted.duckdb"
    torch.manual_seed(0)
    model = HybridLM(tiny_config("M*E")).eval()
    with TraceStore(path) as store:
        with pytest.raises(KeyboardInterrupt), Tracer(store, model="debug-tiny M*E").attach(model) as tracer:
            for i in range(3):
                generate(model, [[1, 2, 3 + i]], 4)
            raise KeyboardInterrupt  # Ctrl-C in the middle of a profile
        with Tracer(store, model="debug-tiny M*E").attach(model) as finished:
            generate(model, [[1, 2, 3]], 4)
    con = duckdb.connect(str(path), read_only=True)
    [(steps,)] = con.execute("SELECT count(DISTINCT step) FROM events WHERE run_id = ?", [tracer.run_id]).fetchall()
    con.close()
    assert steps == 3 * 4  # 3 generate calls: a prefill and 3 decode steps each
    assert report.report_main(path, run=tracer.run_id) == 0
    assert f"INCOMPLETE: no end recorded (killed or interrupted); holds {steps} steps" in capsys.readouterr().out
    assert report.report_main(path, run=finished.run_id) == 0
    assert "INCOMPLETE" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def two_patterns(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "patterns.duckdb"
    with TraceStore(path) as store:
        baseline = record_run(store, "M*-E", num_requests=1, new_tokens=3)
        candidate = record_run(store, "MG*E", num_requests=1, new_tokens=3)
    return path, baseline, candidate


def test_a_baseline_of_another_pattern_warns_and_compares_shared_layer_types(two_patterns, capsys):
    path, baseline, candidate = two_patterns
    assert report.report_main(path, run=candidate, run2=baseline, as_json=True) == 0
    captured = capsys.readouterr()
    warning = captured.err.strip()
    assert warning.count("\n") == 0 and warning.startswith("hybridlm report: warning: baseline run")
    assert f"run {baseline} is debug-tiny M*-E but candidate run {candidate} is debug-tiny MG*E" in warning
    assert "comparing only the layer types both have: mamba2, attention, moe" in warning
    assert "left out: gdn (candidate only), mlp (baseline only)" in warning
    doc = json.loads(captured.out)
    assert {c["layer_type"] for c in doc["comparison"]["changes"]} == {"mamba2", "attention", "moe"}
    assert doc["baseline"]["same_model"] is False
    # the same pattern compares as before, without a warning
    assert report.report_main(path, run=candidate, run2=candidate) == 0
    assert capsys.readouterr().err == ""


def test_the_report_says_which_rule_labelled_how_much_time(imported, capsys):
    path, run_id = imported
    con = duckdb.connect(str(path), read_only=True)
    expected = dict(
        con.execute(
            "SELECT coalesce(layer_rule, 'unattributed'), sum(duration_us) FROM events "
            "WHERE run_id = ? AND source = 'cuda' GROUP BY 1",
            [run_id],
        ).fetchall()
    )
    con.close()
    total = sum(expected.values())
    assert report.report_main(path, as_json=True) == 0
    rules = json.loads(capsys.readouterr().out)["attribution_rules"]
    assert {r["rule"]: r["total_us"] for r in rules} == pytest.approx(expected)
    assert {r["rule"]: r["share"] for r in rules} == pytest.approx({k: v / total for k, v in expected.items()})
    assert {"enclosing range name", "unattributed"} <= set(expected)
    assert report.report_main(path) == 0
    text = capsys.readouterr().out
    assert "which rule gave each cuda event its layer type" in text
    for rule, time in expected.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(rule))
        assert line.rstrip().endswith(f"{time / total:.1%}")
