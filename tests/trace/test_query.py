"""`hybridlm query`: the design's p50/p99 query on imported and recorded traces, and its errors."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json

import duckdb
import numpy as np
import pytest

from hybridlm.trace.importers import import_trace
from hybridlm.trace.query import format_csv, format_json, format_table, format_value, run_query
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import TraceStore
from tests.helpers import FIXTURES

KINETO = FIXTURES / "kineto" / "sampled_rank-1.json.gz"

P99_QUERY = (
    "SELECT name, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_us) AS p50, "
    "percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_us) AS p99 FROM events WHERE source='{source}' "
    "GROUP BY name ORDER BY p99 DESC LIMIT 20"
)


@pytest.fixture(scope="module")
def kineto_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "kineto.duckdb"
    with TraceStore(path) as store:
        import_trace(KINETO, store)
    return path


@pytest.mark.parametrize(("source", "category"), [("cpu", "cpu_op"), ("cuda", "kernel")])
def test_design_query_on_an_imported_trace(kineto_db, source, category):
    columns, rows = run_query(kineto_db, P99_QUERY.format(source=source))
    assert columns == ["name", "count_star()", "p50", "p99"]
    assert len(rows) == 20
    durations: dict[str, list[float]] = {}
    for e in json.loads(gzip.decompress(KINETO.read_bytes()))["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") == category:
            durations.setdefault(e["name"], []).append(e["dur"])
    p99 = {name: np.percentile(d, 99) for name, d in durations.items()}
    assert [r[3] for r in rows] == pytest.approx(sorted(p99.values(), reverse=True)[:20])
    for name, n, p50, p99_value in rows:
        assert n == len(durations[name])
        assert (p50, p99_value) == pytest.approx((np.percentile(durations[name], 50), p99[name]))
    text = format_table(columns, rows)
    assert "(20 rows)" in text
    for name, *_ in rows:
        assert name in text  # whole kernel names, however long: nothing cut


def test_design_query_on_recorded_data(tmp_path):
    path = tmp_path / "recorded.duckdb"
    with TraceStore(path) as store:
        run = store.new_run(model="debug-tiny")
        rows = [
            ("cpu", name, layer, kind, "decode", step, float(step), duration, 1, 1, 0, None, 1, 1)
            for step in range(50)
            for name, layer, kind, duration in (
                ("aten::mm", 0, "attention", 10.0 + step),
                ("aten::softmax", 0, "attention", 2.0),
                ("aten::topk", 1, "moe", 5.0 + (step == 49) * 100),
            )
        ]
        store.add_events(run, rows)
    _, result = run_query(path, P99_QUERY.format(source="cpu"))
    by_name = {r[0]: r[1:] for r in result}
    assert [r[0] for r in result] == ["aten::mm", "aten::topk", "aten::softmax"]
    assert by_name["aten::topk"][0] == 50
    assert by_name["aten::topk"][1:] == pytest.approx((5.0, np.percentile([5.0] * 49 + [105.0], 99)))
    assert by_name["aten::mm"][1:] == pytest.approx((34.5, 10 + np.percentile(np.arange(50), 99)))


def test_sql_errors_are_trace_errors_with_duckdb_message(kineto_db):
    with pytest.raises(TraceError, match=r"query failed: Parser Error: syntax error"):
        run_query(kineto_db, "SELEC name FROM events")
    with pytest.raises(TraceError, match=r'query failed: Binder Error: Referenced column "durration_us"'):
        run_query(kineto_db, "SELECT durration_us FROM events")
    with pytest.raises(TraceError, match=r"read-only; this is a DELETE statement"):
        run_query(kineto_db, "DELETE FROM events")
    with pytest.raises(TraceError, match=r"nowhere\.duckdb: no such file"):
        run_query(kineto_db.parent / "nowhere.duckdb", "SELECT 1")
    with pytest.raises(TraceError, match=r"sampled_rank-1\.json\.gz: is not a DuckDB file.*hybridlm import"):
        run_query(KINETO, "SELECT 1")


def test_format_table_aligns_numbers_and_spells_null():
    text = format_table(["name", "n", "p99"], [("a_very_long_kernel_name_" * 8, 3, 1234.5678), ("b", None, 0.5)])
    lines = text.splitlines()
    assert "a_very_long_kernel_name_" * 8 in text
    assert lines[-1] == "(2 rows)"
    row_a, row_b = lines[2], lines[3]
    assert row_a.endswith("3   1,234.6") and row_b.endswith("NULL       0.5")
    assert format_table(["x"], []).splitlines()[-1] == "(0 rows)"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "NULL"),
        (True, "true"),
        (1230493, "1230493"),
        (0.0, "0"),
        (0.000123, "0.000123"),
        (3.14159, "3.142"),
        (1234.56, "1,234.6"),
        (1774015573210657.5, "1,774,015,573,210,658"),
        (float("nan"), "nan"),
        ("L12.moe", "L12.moe"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


# Values that are rich markup, or look like it: printed literally, never interpreted.
MARKUP_SQL = "SELECT '[true, false]' AS a, '[/]' AS b, '[bold]x[/bold]' AS c, ':smile:' AS \"[red]d\""


def test_cells_and_headers_are_printed_literally(kineto_db):
    columns, rows = run_query(kineto_db, MARKUP_SQL)
    assert rows == [("[true, false]", "[/]", "[bold]x[/bold]", ":smile:")]
    lines = format_table(columns, rows).splitlines()
    assert lines[0].split() == ["a", "b", "c", "[red]d"]
    assert lines[2].split() == ["[true,", "false]", "[/]", "[bold]x[/bold]", ":smile:"]


def test_control_characters_are_shown_escaped_in_the_table_and_kept_in_json(kineto_db):
    """A trace can hold any name; an ESC sequence in a cell must not drive the user's terminal."""
    sql = "SELECT chr(27) || '[31mRED' AS esc, 'a' || chr(10) || 'b' || chr(13) AS two_lines"
    columns, rows = run_query(kineto_db, sql)
    table = format_table(columns, rows)
    assert not any(ord(c) < 0x20 and c != "\n" for c in table) and len(table.splitlines()) == 4
    assert table.splitlines()[2].split() == ["\\x1b[31mRED", "a\\nb\\r"]
    assert json.loads(format_json(columns, rows)) == [{"esc": "\x1b[31mRED", "two_lines": "a\nb\r"}]


@pytest.mark.parametrize(
    ("sql", "named"), [("ATTACH 'x.duckdb' AS x", "an ATTACH statement"), ("INSTALL httpfs", "an INSTALL or LOAD")]
)
def test_refused_statements_are_named_as_a_user_wrote_them(kineto_db, sql, named):
    with pytest.raises(TraceError, match=f"read-only; this is {named}"):
        run_query(kineto_db, sql)


def test_several_statements_are_refused_by_name(kineto_db):
    with pytest.raises(TraceError, match=r"got 2 statements \(SELECT, SELECT\); give one statement per query"):
        run_query(kineto_db, "SELECT 1; SELECT 2")
    columns, rows = run_query(kineto_db, "SELECT 2 AS two;")  # a trailing semicolon is one statement
    assert (columns, rows) == (["two"], [(2,)])


def test_queries_never_write_the_trace_or_any_file(kineto_db, tmp_path):
    before = hashlib.sha256(kineto_db.read_bytes()).hexdigest()
    target = tmp_path / "out.csv"
    for sql in (
        f"COPY (SELECT 1) TO '{target}'",
        f"COPY (SELECT 1) TO '{kineto_db}'",  # would replace the trace itself
        "CREATE TABLE t AS SELECT 1",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
        "INSERT INTO runs (run_id) VALUES ('x')",
    ):
        with pytest.raises(TraceError, match="read-only"):
            run_query(kineto_db, sql)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert hashlib.sha256(kineto_db.read_bytes()).hexdigest() == before
    missing = tmp_path / "missing.duckdb"
    with pytest.raises(TraceError, match="no such file"):
        run_query(missing, "SELECT 1")
    assert not missing.exists()


SCRIPT_SQL = (
    "SELECT name, count(*) AS n, avg(duration_us) AS mean_us, max(range_name) AS range_name, "
    "list(DISTINCT layer_type ORDER BY layer_type) AS types FROM events WHERE source = 'cuda' "
    "GROUP BY name ORDER BY n DESC, name LIMIT 15"
)


def reference_rows(db, sql: str) -> list[tuple]:
    """The same query through a plain read-only DuckDB connection."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_json_output_is_a_list_of_row_objects_with_every_value(kineto_db):
    expected = reference_rows(kineto_db, SCRIPT_SQL)
    doc = json.loads(format_json(*run_query(kineto_db, SCRIPT_SQL)))
    assert [list(obj) for obj in doc] == [["name", "n", "mean_us", "range_name", "types"]] * len(expected)
    assert [tuple(obj.values()) for obj in doc] == [(a, b, c, d, list(e)) for a, b, c, d, e in expected]
    markup = json.loads(format_json(*run_query(kineto_db, MARKUP_SQL)))
    assert markup == [{"a": "[true, false]", "b": "[/]", "c": "[bold]x[/bold]", "[red]d": ":smile:"}]
    special = json.loads(
        format_json(*run_query(kineto_db, "SELECT 'nan'::DOUBLE AS x, NULL AS y, DATE '2024-02-29' AS d"))
    )
    assert special == [{"x": None, "y": None, "d": "2024-02-29"}]
    with pytest.raises(TraceError, match=r"repeated column names \['x'\]"):
        format_json(*run_query(kineto_db, "SELECT 1 AS x, 2 AS x"))


def test_csv_output_reads_back_with_the_csv_module(kineto_db):
    expected = reference_rows(kineto_db, SCRIPT_SQL)
    text = format_csv(*run_query(kineto_db, SCRIPT_SQL))
    assert text.startswith("name,n,mean_us,range_name,types\r\n") and text.endswith("\r\n")  # CRLF, as RFC 4180
    header, *records = list(csv.reader(io.StringIO(text, newline="")))
    assert header == ["name", "n", "mean_us", "range_name", "types"]
    assert len(records) == len(expected)
    for record, (name, n, mean, range_name, types) in zip(records, expected, strict=True):
        assert record[0] == name and int(record[1]) == n and float(record[2]) == mean  # every digit kept
        assert record[3] == (range_name or "") and json.loads(record[4]) == list(types)
    tricky = format_csv(*run_query(kineto_db, "SELECT 'a,\"b\"' AS x, NULL AS y, 'two\nlines' AS z"))
    assert list(csv.reader(io.StringIO(tricky, newline=""))) == [["x", "y", "z"], ['a,"b"', "", "two\nlines"]]
