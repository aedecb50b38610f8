"""`hybridlm query`: the design's p50/p99 query on imported and recorded traces, and its errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from hybridlm.trace.importers import import_trace
from hybridlm.trace.query import format_table, format_value, run_query
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
    with pytest.raises(TraceError, match=r"read-only; got a DELETE statement"):
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
