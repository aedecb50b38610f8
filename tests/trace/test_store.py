"""TraceStore: buffered writes, one file shared by runs, read-only opening, and crash safety."""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

import hybridlm
from hybridlm.trace import store as store_module
from hybridlm.trace.schema import (
    DDL,
    EVENT_BASE_COLUMNS,
    EVENT_COLUMNS,
    EVENT_ROW_COLUMNS,
    ROUTING_COLUMNS,
    TABLE_COLUMNS,
    TABLES,
    TraceError,
)
from hybridlm.trace.store import TraceStore, open_readonly

SRC = str(Path(hybridlm.__file__).resolve().parents[1])


def layer_row(layer: int, duration: float, step: int = 0) -> tuple:
    """A base-length row: source, name, layer, layer_type, phase, step, start, duration, batch,
    tokens, rank, stream, pid, tid."""
    return ("layer", f"L{layer}.moe", layer, "moe", "decode", step, 10.0 * step, duration, 4, 4, 0, None, 1, 2)


def count(con: duckdb.DuckDBPyConnection, sql: str = "SELECT count(*) FROM events") -> int:
    return con.execute(sql).fetchall()[0][0]


def test_schema_lists_match_the_ddl(tmp_path):
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    for statement in DDL:
        con.execute(statement)
    for table in TABLES:
        columns = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        assert tuple(columns) == TABLE_COLUMNS[table]
    assert EVENT_COLUMNS[: len(EVENT_BASE_COLUMNS)] == EVENT_BASE_COLUMNS
    assert EVENT_COLUMNS[1:] == EVENT_ROW_COLUMNS


def test_round_trip_of_events_routing_and_runs(tmp_path):
    path = tmp_path / "trace.duckdb"
    with TraceStore(path) as store:
        run = store.new_run(model="debug-tiny", device="cpu", config={"pattern": "M*E"}, command="x")
        store.add_events(run, [layer_row(0, 1.5), layer_row(1, 2.5)])
        # a full-length row fills the importer extras too
        store.add_events(run, [(*layer_row(2, 3.5), 0, 77, "L2.moe", 4096)])
        store.add_routing(run, [(0, "decode", 1, expert, 10 + expert, 0) for expert in range(3)])
        store.add_routing(run, [(0, "decode", 1, 3, 13, 0, 2)])  # a row of rank 2 of an expert-parallel run
    con = open_readonly(path)
    rows = con.execute("SELECT layer, duration_us, correlation, bytes FROM events ORDER BY layer").fetchall()
    assert rows == [(0, 1.5, None, None), (1, 2.5, None, None), (2, 3.5, 77, 4096)]
    routing = con.execute(f"SELECT {', '.join(ROUTING_COLUMNS)} FROM routing ORDER BY expert").fetchall()
    # a row without its rank is rank 0's (one process)
    assert routing == [(run, 0, "decode", 1, e, 10 + e, 0, 0 if e < 3 else 2) for e in range(4)]
    (run_row,) = con.execute("SELECT kind, model, device, config_json, software_json FROM runs").fetchall()
    assert run_row[:3] == ("recorded", "debug-tiny", "cpu")
    assert json.loads(run_row[3]) == {"pattern": "M*E"}
    software = json.loads(run_row[4])
    assert set(software) == {"python", "torch", "duckdb", "hybridlm"}
    assert software["duckdb"] == duckdb.__version__


def test_rows_are_buffered_until_flush_or_flush_every(tmp_path):
    store = TraceStore(tmp_path / "t.duckdb", flush_every=10)
    run = store.new_run()
    store.add_events(run, [layer_row(i, 1.0) for i in range(6)])
    assert count(store.connection) == 0  # buffered
    store.add_events(run, [layer_row(i, 1.0) for i in range(4)])
    assert count(store.connection) == 10  # reached flush_every
    store.add_routing(run, [(0, "decode", 0, 0, 5, 0)])
    assert count(store.connection, "SELECT count(*) FROM routing") == 0
    store.flush()
    assert count(store.connection, "SELECT count(*) FROM routing") == 1
    store.close()


def test_columnar_events_mix_with_rows_and_numpy(tmp_path):
    store = TraceStore(tmp_path / "t.duckdb")
    run = store.new_run(kind="imported")
    durations = np.array([1.0, 2.0, 4.0])
    store.add_event_columns(run, {"source": ["cuda"] * 3, "name": ["k"] * 3, "duration_us": durations})
    store.add_events(run, [layer_row(5, 3.0)])
    store.flush()  # columns and rows in one Arrow batch
    # numpy scalars, which the Appender does not take, go through Arrow
    numpy_row = ("cpu", "aten::mm", None, None, None, np.int64(3), 0.0, np.float32(8.0), *(None,) * 6)
    store.add_events(run, [numpy_row])
    store.flush()
    rows = store.connection.execute(
        "SELECT source, name, step, duration_us, layer, pid FROM events ORDER BY duration_us"
    ).fetchall()
    assert rows == [
        ("cuda", "k", None, 1.0, None, None),
        ("cuda", "k", None, 2.0, None, None),
        ("layer", "L5.moe", 0, 3.0, 5, 1),
        ("cuda", "k", None, 4.0, None, None),
        ("cpu", "aten::mm", 3, 8.0, None, None),
    ]
    store.close()


def test_arrow_path_when_there_is_no_appender(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_USE_APPENDER", False)
    with TraceStore(tmp_path / "t.duckdb") as store:
        run = store.new_run()
        store.add_events(run, [layer_row(i, float(i)) for i in range(100)])
        store.add_routing(run, [(0, "prefill", 0, e, 1, 0) for e in range(8)])
        store.flush()
        assert count(store.connection, "SELECT sum(duration_us)::INTEGER FROM events") == sum(range(100))
        assert count(store.connection, "SELECT count(*) FROM routing") == 8


def test_bad_rows_are_refused_with_the_expected_columns(tmp_path):
    with TraceStore(tmp_path / "t.duckdb") as store:
        run = store.new_run()
        with pytest.raises(ValueError, match="expected 14"):
            store.add_events(run, [layer_row(0, 1.0), ("cpu", "x")])
        with pytest.raises(ValueError, match="unknown event columns"):
            store.add_event_columns(run, {"durations": [1.0]})
        with pytest.raises(ValueError, match="differ in length"):
            store.add_event_columns(run, {"name": ["a", "b"], "duration_us": [1.0]})
        with pytest.raises(ValueError, match="routing row"):
            store.add_routing(run, [(0, "decode", 1)])
        with pytest.raises(ValueError, match="run kind"):
            store.new_run(kind="live")
        store.flush()
        assert count(store.connection) == 0  # the good row before the bad one was not kept either


def test_runs_share_a_file_and_survive_reopening(tmp_path):
    path = tmp_path / "t.duckdb"
    with TraceStore(path) as store:
        first = store.new_run(model="a")
        store.add_events(first, [layer_row(0, 1.0)] * 3)
    with TraceStore(path) as store:
        second = store.new_run(model="b")
        store.add_events(second, [layer_row(0, 1.0)] * 5)
        store.flush()
        assert [r["run_id"] for r in store.runs()] == [first, second]
        assert store.latest_run_id() == second
        by_run = dict(store.connection.execute("SELECT run_id, count(*) FROM events GROUP BY 1").fetchall())
        assert by_run == {first: 3, second: 5}
    assert first != second and len(first) == 12


def test_closed_store_refuses_writes(tmp_path):
    store = TraceStore(tmp_path / "t.duckdb")
    run = store.new_run()
    store.close()
    store.close()  # twice is fine
    with pytest.raises(TraceError, match="closed"):
        store.add_events(run, [layer_row(0, 1.0)])


def test_export_parquet_one_file_per_table(tmp_path):
    with TraceStore(tmp_path / "t.duckdb") as store:
        a, b = store.new_run(), store.new_run()
        store.add_events(a, [layer_row(0, 1.0)] * 2)
        store.add_events(b, [layer_row(1, 1.0)] * 3)
        store.add_routing(b, [(0, "decode", 1, 0, 3, 0)])
        everything = store.export_parquet(tmp_path / "all")
        only_b = store.export_parquet(tmp_path / "b", run_id=b)
    assert [p.name for p in everything] == ["runs.parquet", "events.parquet", "routing.parquet"]
    assert pq.read_table(everything[1]).num_rows == 5
    events_b = pq.read_table(only_b[1])
    assert events_b.num_rows == 3 and set(events_b.column("run_id").to_pylist()) == {b}
    assert events_b.column_names == list(EVENT_COLUMNS)
    assert pq.read_table(only_b[0]).num_rows == 1 and pq.read_table(only_b[2]).num_rows == 1


def test_old_file_gains_the_extra_columns(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    text_columns = ("run_id", "source", "name")
    base = ", ".join(f"{c} {'VARCHAR' if c in text_columns else 'DOUBLE'}" for c in EVENT_BASE_COLUMNS)
    con.execute(f"CREATE TABLE events ({base})")
    con.close()
    with TraceStore(path) as store:
        columns = [r[0] for r in store.connection.execute("DESCRIBE events").fetchall()]
    assert columns[-5:] == ["device_id", "correlation", "range_name", "bytes", "layer_rule"]


# -- open_readonly -----------------------------------------------------------------------------------


def test_open_readonly_names_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(TraceError, match=r"missing\.duckdb: no such file; expected a DuckDB trace"):
        open_readonly(tmp_path / "missing.duckdb")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 10)
    with pytest.raises(TraceError, match=r"notes\.txt: is not a DuckDB file; expected a DuckDB trace"):
        open_readonly(text)
    lite = tmp_path / "trace.db"
    sqlite3.connect(lite).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(TraceError, match=r"trace\.db: is a SQLite file.*hybridlm import"):
        open_readonly(lite)
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).execute("CREATE TABLE t (a INTEGER)")
    with pytest.raises(TraceError, match=r"other\.duckdb: is a DuckDB database without the trace tables"):
        open_readonly(other)
    with pytest.raises(TraceError, match=r"trace\.db: is a SQLite file"):
        TraceStore(lite)  # never overwrite a foreign file


def test_open_readonly_while_this_process_writes(tmp_path):
    path = tmp_path / "t.duckdb"
    store = TraceStore(path)
    run = store.new_run()
    store.add_events(run, [layer_row(0, 1.0)] * 7)
    store.flush()
    store.add_events(run, [layer_row(0, 1.0)] * 2)  # still buffered
    con = open_readonly(path)
    assert count(con) == 7
    con.close()
    store.close()
    assert count(open_readonly(path)) == 9


class LineReader:
    """Lines from a child's stdout with a deadline (select on the raw pipe, no blocking reads)."""

    def __init__(self, proc: subprocess.Popen, timeout_s: float):
        self.proc, self.deadline, self.buffer = proc, time.monotonic() + timeout_s, b""

    def next(self) -> str:
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child printed nothing in time; stderr: {self._stderr()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"child exited ({self.proc.wait()}); stderr: {self._stderr()}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode()[-2000:]


def start_child(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        bufsize=0,
    )


WRITER = r"""
import sys, time
from hybridlm.trace.store import TraceStore

path, batches, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = TraceStore(path, flush_every=10**9)
run = store.new_run(model="sigkill")

def rows(step, n):
    # start_us encodes (step, i) so the test can check every row came back intact
    return [("cpu", f"op{i % 7}", None, None, None, step, step * 1e6 + i, 1.0 + i % 13,
             None, None, 0, None, 1, 1) for i in range(n)]

for step in range(batches):
    store.add_events(run, rows(step, size))
    store.flush()
    print("flushed", step, flush=True)
step = batches
while True:
    if mode == "buffer":  # never flushed: lost at SIGKILL, by design
        store.add_events(run, rows(step, 100))
        print("buffered", step, flush=True)
        time.sleep(0.005)
    elif mode == "flush":  # keep flushing: the kill lands before, inside or after a flush
        store.add_events(run, rows(step, size))
        store.flush()
        print("flushed", step, flush=True)
    else:  # hold the file open as a writer until stdin closes
        print("ready", flush=True)
        sys.stdin.read()
        break
    step += 1
"""


def check_flushed_rows(path: Path, size: int, at_least_steps: int) -> int:
    con = open_readonly(path)
    steps = con.execute(
        "SELECT step, count(*), min(start_us - step * 1e6), max(start_us - step * 1e6), sum(duration_us) "
        "FROM events GROUP BY step ORDER BY step"
    ).fetchall()
    con.close()
    expected_sum = sum(1.0 + i % 13 for i in range(size))
    assert len(steps) >= at_least_steps
    assert [s[0] for s in steps] == list(range(len(steps)))  # no gap, no partial batch
    for step, n, lowest, highest, total in steps:
        assert (n, lowest, highest, total) == (size, 0, size - 1, expected_sum), f"step {step}"
    return len(steps)


def test_sigkill_after_flushes_loses_only_unflushed_rows(tmp_path):
    path, batches, size = tmp_path / "killed.duckdb", 5, 3000
    proc = start_child(WRITER, str(path), str(batches), str(size), "buffer")
    try:
        reader = LineReader(proc, timeout_s=60)
        lines = [reader.next() for _ in range(batches)]
        assert lines == [f"flushed {i}" for i in range(batches)]
        assert reader.next().startswith("buffered")  # unflushed rows exist at the kill
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert check_flushed_rows(path, size, batches) == batches  # exactly the flushed ones
    with TraceStore(path) as store:  # and the file is still writable
        assert len(store.runs()) == 1


def test_sigkill_during_flushes_keeps_whole_batches(tmp_path):
    path, batches, size = tmp_path / "killed.duckdb", 5, 3000
    proc = start_child(WRITER, str(path), str(batches), str(size), "flush")
    try:
        reader = LineReader(proc, timeout_s=60)
        acknowledged = 0
        while acknowledged < batches + 3:
            assert reader.next() == f"flushed {acknowledged}"
            acknowledged += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    check_flushed_rows(path, size, acknowledged)


def test_open_readonly_while_another_process_writes(tmp_path):
    path = tmp_path / "held.duckdb"
    proc = start_child(WRITER, str(path), "2", "500", "hold")
    try:
        reader = LineReader(proc, timeout_s=60)
        assert [reader.next() for _ in range(3)] == ["flushed 0", "flushed 1", "ready"]
        with pytest.raises(duckdb.IOException, match="lock"):
            duckdb.connect(str(path), read_only=True)  # what DuckDB alone does
        con = open_readonly(path)  # reads a snapshot instead
        assert count(con) == 1000
        con.close()
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
