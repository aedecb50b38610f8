"""TraceStore: the embedded DuckDB file that recorded and imported traces go to.

Writes are buffered in memory and go to the file in one batch per table at each `flush` (the DuckDB
Appender where this duckdb has one, else one INSERT from an Arrow table), inside one transaction
that is committed before `flush` returns: a process killed after a flush (even by SIGKILL) leaves a
file that opens and holds every flushed row; only rows buffered since the last flush are lost.

DuckDB lets one process write a file, and nobody else open it meanwhile, not even read-only. So
`open_readonly` (for reports and `hybridlm query`) falls back to reading a snapshot copy of the
file and its write-ahead log when a writer holds the lock.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from hybridlm.trace.schema import (
    COLUMN_TYPES,
    DDL,
    EVENT_COLUMNS,
    EVENT_ROW_BASE_LEN,
    EVENT_ROW_COLUMNS,
    ROUTING_COLUMNS,
    ROUTING_ROW_COLUMNS,
    RUN_COLUMNS,
    RUN_KINDS,
    TABLES,
    TraceError,
)

_DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file
_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "TIMESTAMP": pa.timestamp("us"),
}
# DuckDB's Python Appender (duckdb >= 2.0); older versions insert one Arrow table per batch.
_USE_APPENDER = hasattr(duckdb.DuckDBPyConnection, "appender")
_EXPECTED = "a DuckDB trace database written by hybridlm (TraceStore or `hybridlm import`)"

# TraceStores open in this process, by resolved path: open_readonly reads through them, because
# DuckDB refuses a second, read-only handle on a file this process already has open for writing.
_OPEN_STORES: dict[Path, weakref.ref[TraceStore]] = {}
_OPEN_STORES_LOCK = threading.Lock()


def arrow_schema(table: str) -> pa.Schema:
    return pa.schema([(name, _ARROW_TYPES[t.split()[0]]) for name, t in COLUMN_TYPES[table].items()])


def software_versions() -> dict[str, str]:
    """Versions of what produced a run: python, torch, duckdb, hybridlm."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "duckdb": duckdb.__version__}
    for package in ("torch", "hybridlm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _to_json(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.dumps(value, sort_keys=True, default=str)


def _sniff(path: Path) -> str:
    """'duckdb', 'sqlite', 'empty' or 'other', from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head[8:12] == _DUCKDB_MAGIC:
        return "duckdb"
    if head.startswith(b"SQLite format 3\x00"):
        return "sqlite"
    return "other"


def _not_a_trace(path: Path, kind: str) -> TraceError:
    hint = ""
    if kind == "sqlite" or path.suffix in (".json", ".gz"):
        hint = " It looks like a profiler trace: import it first with `hybridlm import FILE --db DB`."
    what = {"sqlite": "a SQLite file", "empty": "an empty file"}.get(kind, "not a DuckDB file")
    return TraceError(f"{path}: is {what}; expected {_EXPECTED}.{hint}")


def check_trace_path(path: Path) -> None:
    """Refuse, before anything is built or written, a path a trace database cannot be written to:
    another kind of file, a directory, or a file standing where a parent directory must be."""
    _refuse_file_as_parent(path)
    if path.is_dir():
        raise TraceError(f"{path} is a directory; give a file name for the trace database")
    if path.exists():
        kind = _sniff(path)
        if kind not in ("duckdb", "empty"):
            raise _not_a_trace(path, kind)


def make_parent_dirs(path: Path) -> None:
    """Create ``path``'s missing parent directories (for any file a report writes)."""
    _refuse_file_as_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)


def _refuse_file_as_parent(path: Path) -> None:
    """A file standing where a parent directory must be is named (``mkdir`` would only say "File exists")."""
    for ancestor in reversed(path.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise TraceError(f"{path}: {ancestor} is a file, not a directory")


class TraceStore:
    """Buffered writer of runs, events and routing rows to one DuckDB file.

    Several runs share a file, told apart by `run_id`. Use as a context manager, or call `close`;
    an open store is also flushed and closed at interpreter exit.
    """

    def __init__(self, path: str | os.PathLike, flush_every: int = 4096):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = Path(path)
        self.flush_every = flush_every
        check_trace_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.Error as e:
            raise TraceError(f"{self.path}: cannot open for writing: {e}") from None
        self._lock = threading.RLock()
        self._event_rows: list[tuple] = []
        self._event_tables: list[pa.Table] = []
        self._routing_rows: list[tuple] = []
        self._pending = 0
        self._closed = False
        self._create_tables()
        with _OPEN_STORES_LOCK:
            _OPEN_STORES[self.path.resolve()] = weakref.ref(self)
        atexit.register(self.close)

    def _create_tables(self) -> None:
        for statement in DDL:
            self._con.execute(statement)
        # A file written by an older hybridlm may lack the nullable columns added since.
        for table in TABLES:
            have = {
                row[0]
                for row in self._con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
                ).fetchall()
            }
            for name, sql_type in COLUMN_TYPES[table].items():
                if name not in have:
                    self._con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type.split()[0]}")

    # -- writing ---------------------------------------------------------------------------------

    def new_run(
        self,
        *,
        kind: str = "recorded",
        model: str | None = None,
        device: str | None = None,
        config: Any = None,
        software: Mapping[str, Any] | None = None,
        command: str | None = None,
        source_file: str | os.PathLike | None = None,
        notes: str | None = None,
    ) -> str:
        """Insert a `runs` row (committed at once) and return its new run_id.

        `config` may be a dict, a dataclass, an object with `to_dict()`, or a JSON string.
        """
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind must be one of {RUN_KINDS}, got {kind!r}")
        self._check_open()
        run_id = uuid.uuid4().hex[:12]
        row = {
            "run_id": run_id,
            "created_at": datetime.now(UTC).replace(tzinfo=None),
            "kind": kind,
            "model": model,
            "device": device,
            "config_json": _to_json(config),
            "software_json": _to_json(software_versions() if software is None else dict(software)),
            "command": command,
            "source_file": None if source_file is None else str(source_file),
            "notes": notes,
            "ended_at": None,  # set by end_run; a killed run keeps NULL
        }
        placeholders = ", ".join("?" for _ in RUN_COLUMNS)
        with self._lock:
            self._con.execute(
                f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({placeholders})",
                [row[c] for c in RUN_COLUMNS],
            )
        return run_id

    def end_run(self, run_id: str) -> None:
        """Flush, then mark `run_id` complete (runs.ended_at = now). A run that never gets here (the
        process was killed, or the work raised) stays incomplete, and reports say so."""
        with self._lock:
            self._check_open()
            self.flush()
            self._con.execute(
                "UPDATE runs SET ended_at = ? WHERE run_id = ?", [datetime.now(UTC).replace(tzinfo=None), run_id]
            )

    def add_events(self, run_id: str, rows: Iterable[Sequence]) -> None:
        """Buffer event rows: tuples in `EVENT_ROW_COLUMNS` order (EVENT_COLUMNS without run_id).

        A row may stop after `tid` (the base columns) or after any extra column; the extra columns
        it leaves out are NULL (so rows written before a column was added still fit).
        """
        full = len(EVENT_ROW_COLUMNS)
        with self._lock:
            self._check_open()
            buffer = self._event_rows
            before = len(buffer)
            for row in rows:
                n = len(row)
                if not EVENT_ROW_BASE_LEN <= n <= full:
                    del buffer[before:]
                    raise ValueError(
                        f"an event row has {n} values; expected {EVENT_ROW_BASE_LEN} "
                        f"({', '.join(EVENT_ROW_COLUMNS[:EVENT_ROW_BASE_LEN])}) up to {full} (then "
                        f"{', '.join(EVENT_ROW_COLUMNS[EVENT_ROW_BASE_LEN:])}): {tuple(row)!r}"
                    )
                buffer.append((run_id, *row, *(None,) * (full - n)))
            self._added(len(buffer) - before)

    def add_event_columns(self, run_id: str, columns: Mapping[str, Sequence]) -> None:
        """Buffer events given column-wise: {column name: values}; absent columns are NULL.

        The bulk form importers use: values may be lists, numpy arrays or Arrow arrays.
        """
        unknown = set(columns) - set(EVENT_ROW_COLUMNS)
        if unknown:
            raise ValueError(f"unknown event columns {sorted(unknown)}; known: {list(EVENT_ROW_COLUMNS)}")
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"event columns differ in length: {lengths}")
        n = next(iter(lengths.values()), 0)
        if n == 0:
            return
        schema = arrow_schema("events")
        arrays = []
        for field in schema:
            if field.name == "run_id":
                arrays.append(pa.array([run_id] * n, pa.string()))
            elif field.name in columns:
                try:
                    arrays.append(pa.array(columns[field.name], field.type))
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise ValueError(f"event column {field.name!r} ({field.type}): {e}") from None
            else:
                arrays.append(pa.nulls(n, field.type))
        table = pa.Table.from_arrays(arrays, schema=schema)
        with self._lock:
            self._check_open()
            self._event_tables.append(table)
            self._added(n)

    def add_routing(self, run_id: str, rows: Iterable[Sequence]) -> None:
        """Buffer routing rows: tuples (step, phase, layer, expert, tokens, dropped[, rank]); a row
        without the rank stores 0 (one process)."""
        width = len(ROUTING_ROW_COLUMNS)
        with self._lock:
            self._check_open()
            buffer = self._routing_rows
            before = len(buffer)
            for row in rows:
                if len(row) not in (width - 1, width):
                    del buffer[before:]
                    raise ValueError(
                        f"a routing row has {len(row)} values; expected {width} "
                        f"({', '.join(ROUTING_ROW_COLUMNS)}; rank may be left out): {tuple(row)!r}"
                    )
                buffer.append((run_id, *row, *((0,) if len(row) < width else ())))
            self._added(len(buffer) - before)

    def _added(self, n: int) -> None:
        self._pending += n
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write every buffered row, one batch per table, and commit.

        If the write fails, the buffered rows are dropped (they would fail again) and the error is
        raised; rows flushed before are untouched.
        """
        with self._lock:
            if self._closed or self._pending == 0:
                return
            event_rows, event_tables, routing_rows = self._event_rows, self._event_tables, self._routing_rows
            self._event_rows, self._event_tables, self._routing_rows = [], [], []
            self._pending = 0
            con = self._con
            con.begin()
            try:
                if event_tables:
                    if event_rows:
                        event_tables.append(_rows_to_arrow("events", event_rows))
                    _insert_arrow(con, "events", pa.concat_tables(event_tables))
                elif event_rows:
                    _append_rows(con, "events", EVENT_COLUMNS, event_rows)
                if routing_rows:
                    _append_rows(con, "routing", ROUTING_COLUMNS, routing_rows)
                con.commit()
            except BaseException:
                con.rollback()
                raise

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                self._closed = True
                self._con.close()
                atexit.unregister(self.close)
                with _OPEN_STORES_LOCK:
                    key = self.path.resolve()
                    if key in _OPEN_STORES and _OPEN_STORES[key]() in (self, None):
                        del _OPEN_STORES[key]

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TraceError(f"{self.path}: this TraceStore is closed")

    # -- reading ---------------------------------------------------------------------------------

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The store's DuckDB connection (flushed rows only; call `flush` first to see the rest)."""
        self._check_open()
        return self._con

    def runs(self) -> list[dict[str, Any]]:
        """Every run in the file, oldest first, as dicts keyed by `RUN_COLUMNS`."""
        with self._lock:
            self._check_open()
            rows = self._con.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs ORDER BY created_at, rowid").fetchall()
        return [dict(zip(RUN_COLUMNS, row, strict=True)) for row in rows]

    def latest_run_id(self) -> str | None:
        with self._lock:
            self._check_open()
            rows = self._con.execute("SELECT run_id FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1").fetchall()
        return rows[0][0] if rows else None

    def export_parquet(self, directory: str | os.PathLike, run_id: str | None = None) -> list[Path]:
        """Write `runs`, `events` and `routing` (of one run, or all) as `<table>.parquet` files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        where = "" if run_id is None else " WHERE run_id = " + _sql_string(run_id)
        paths = []
        with self._lock:
            self._check_open()
            self.flush()
            for table in TABLES:
                path = directory / f"{table}.parquet"
                self._con.execute(f"COPY (SELECT * FROM {table}{where}) TO {_sql_string(str(path))} (FORMAT parquet)")
                paths.append(path)
        return paths


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _rows_to_arrow(table: str, rows: list[tuple]) -> pa.Table:
    schema = arrow_schema(table)
    columns = list(zip(*rows, strict=True))
    arrays = [pa.array(values, field.type) for values, field in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
    view = f"_hybridlm_batch_{table}"
    con.register(view, data)
    try:
        names = ", ".join(data.column_names)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {view}")
    finally:
        con.unregister(view)


def _append_rows(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], rows: list[tuple]):
    """One batch: the DuckDB Appender if this duckdb has one, else one INSERT from Arrow."""
    if _USE_APPENDER:
        appender = con.appender(table, columns=list(columns))
        try:
            appender.append_rows(rows)
        except (duckdb.Error, TypeError, ValueError):
            # The Appender takes plain Python values only; numpy or torch scalars go through Arrow.
            appender.clear()
        else:
            appender.flush()
            return
    _insert_arrow(con, table, _rows_to_arrow(table, rows))


# -- reading a trace file from another process or for reporting ------------------------------------


def open_readonly(path: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection to a trace file, for reports and queries.

    Works while a writer holds the file: inside this process it reads through the writer's
    TraceStore; for another process's writer it reads a snapshot copy (file + write-ahead log),
    which holds everything that writer had flushed when the copy was taken.
    """
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file; expected {_EXPECTED}")
    if not path.is_file():
        raise TraceError(f"{path}: is a directory; expected {_EXPECTED}")
    kind = _sniff(path)
    if kind != "duckdb":
        raise _not_a_trace(path, kind)
    with _OPEN_STORES_LOCK:
        ref = _OPEN_STORES.get(path.resolve())
    store = ref() if ref is not None else None
    if store is not None and not store._closed:
        con = store._con.cursor()
    else:
        try:
            con = duckdb.connect(str(path), read_only=True)
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            message = str(e)
            if "lock" not in message.lower() and "different configuration" not in message:
                raise TraceError(f"{path}: cannot open: {message}") from None
            con = duckdb.connect(str(_snapshot(path)), read_only=True)
        except duckdb.Error as e:
            raise TraceError(f"{path}: cannot open: {e}") from None
    tables = {
        row[0]
        for row in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    }
    missing = [t for t in TABLES if t not in tables]
    if missing:
        con.close()
        raise TraceError(
            f"{path}: is a DuckDB database without the trace tables {missing} "
            f"(has {sorted(tables) or 'no tables'}); expected {_EXPECTED}"
        )
    return con


def _snapshot(path: Path, attempts: int = 3) -> Path:
    """Copy a database file and its WAL to a temporary folder (removed at exit).

    The copy is retried while the writer changes either file during it; a copy taken under
    constant writing can end in a torn WAL record, which DuckDB drops on replay as after a crash.
    """
    folder = Path(tempfile.mkdtemp(prefix="hybridlm-snapshot-"))
    atexit.register(shutil.rmtree, folder, True)
    wal = path.with_name(path.name + ".wal")
    target = folder / path.name

    target_wal = folder / wal.name

    def state() -> tuple:
        stats = []
        for p in (path, wal):
            try:
                stat = p.stat()
                stats.append((stat.st_size, stat.st_mtime_ns))
            except FileNotFoundError:
                stats.append(None)
        return tuple(stats)

    for _ in range(attempts):
        before = state()
        shutil.copyfile(path, target)
        try:
            shutil.copyfile(wal, target_wal)
        except FileNotFoundError:  # no WAL, or the writer checkpointed and removed it meanwhile
            target_wal.unlink(missing_ok=True)
        if state() == before:
            break
    return target
