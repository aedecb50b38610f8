"""Ingero eBPF trace (SQLite) -> events.

Ingero's `events` table stores `source` and `op` as ids into `sources(id, name)` and
`ops(source_id, op_id, name)`, timestamps as Unix-epoch ns and durations as ns. Each event becomes
one row with source = the Ingero source name lower-cased ('cuda' for CUDA runtime API calls,
'driver' for the driver API, 'host' for scheduler / memory / process events, 'io', 'tcp', 'net'),
name = the op name (cudaLaunchKernel, sched_switch, ...), start_us / duration_us = ns / 1000.

Note that Ingero's 'cuda' source is host-side CUDA *runtime API* calls (uprobes on libcudart),
not GPU kernel executions as in the Kineto and Nsight imports: the same `source = 'cuda'` query
then reads as "time spent in CUDA API calls", which is what Ingero itself reports.

Columns differ between Ingero versions (0.9 adds node / rank / local_rank / world_size and text
event ids), so every optional column is looked up first. `arg0` is stored as `bytes` for the ops
whose arg0 Ingero documents as a byte count (allocations and copies); `gpu_id` -> device_id.
Ingero records no kernel names, so layer types come from op names only (mostly None).
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.trace.importers import (
    ACCEPTED,
    attribute_layers,
    finish_import,
    import_sqlite,
    int32_or_none,
    run_for_import,
    sqlite_tables,
)
from hybridlm.trace.schema import TraceError

if TYPE_CHECKING:
    from hybridlm.trace.store import TraceStore

# Ops whose arg0 is a size in bytes (schema_info.arg0_note: "byte size for alloc/memcpy").
_BYTES_OPS = re.compile(r"malloc|memalloc|memcpy|page_alloc", re.IGNORECASE)


def import_ingero(
    path: str | os.PathLike, store: TraceStore, *, command: str | None = None, run_id: str | None = None
) -> str:
    """Import an Ingero SQLite trace as a new run; returns its run_id."""
    return import_sqlite(path, "Ingero SQLite trace", lambda con, file: _import(con, file, store, command, run_id))


def _import(con: sqlite3.Connection, path: Path, store: TraceStore, command: str | None, run_id: str | None) -> str:
    tables = sqlite_tables(con)
    required = {"timestamp", "duration", "source", "op"}
    if not required <= set(tables.get("events", [])):
        raise TraceError(
            f"{path}: Ingero events table lacks {sorted(required - set(tables.get('events', [])))}; expected {ACCEPTED}"
        )
    source_names = {i: str(name).lower() for i, name in con.execute("SELECT id, name FROM sources")}
    op_names = {(s, o): name for s, o, name in con.execute("SELECT source_id, op_id, name FROM ops")}
    info = dict(con.execute("SELECT key, value FROM schema_info")) if "schema_info" in tables else {}
    session = _first_session(con, tables)

    have = set(tables["events"])
    optional = ["pid", "tid", "gpu_id", "arg0", "rank"]
    exprs = [f'"{c}"' if c in have else "NULL" for c in optional]
    rows = con.execute(
        f"SELECT timestamp, duration, source, op, {', '.join(exprs)} FROM events ORDER BY timestamp"
    ).fetchall()
    session_rank = int32_or_none(session.get("rank"))

    names = ("source", "name", "start_us", "duration_us", "rank", "pid", "tid", "device_id", "bytes")
    columns: dict[str, list] = {name: [] for name in names}
    for timestamp, duration, source, op, pid, tid, gpu_id, arg0, rank in rows:
        name = op_names.get((source, op), f"op{op}")
        columns["source"].append(source_names.get(source, f"source{source}"))
        columns["name"].append(name)
        columns["start_us"].append(timestamp / 1000)
        columns["duration_us"].append(duration / 1000)
        columns["rank"].append(int32_or_none(rank) if rank is not None else session_rank)
        columns["pid"].append(int32_or_none(pid))
        columns["tid"].append(int32_or_none(tid))
        columns["device_id"].append(int32_or_none(gpu_id))
        columns["bytes"].append(arg0 if arg0 is not None and _BYTES_OPS.search(name) else None)

    into_existing_run = run_id is not None
    run_id = run_for_import(
        store,
        run_id,
        device=session.get("gpu_model") or None,
        config={
            "format": "ingero",
            "version": info.get("version"),
            "timestamp_unit": info.get("timestamp_unit"),
            "duration_unit": info.get("duration_unit"),
            "session": session,
        },
        command=command,
        source_file=str(path.resolve()),
        notes="start_us is Unix-epoch µs; Ingero 'cuda' events are CUDA runtime API calls",
    )
    columns.update(attribute_layers([None] * len(rows), columns["name"], [None] * len(rows)))  # names only
    store.add_event_columns(run_id, columns)
    finish_import(store, run_id, into_existing_run=into_existing_run)
    return run_id


def _first_session(con: sqlite3.Connection, tables: dict[str, list[str]]) -> dict:
    if "sessions" not in tables:
        return {}
    cursor = con.execute("SELECT * FROM sessions ORDER BY 1 LIMIT 1")
    row = cursor.fetchone()
    if row is None:
        return {}
    return dict(zip([c[0] for c in cursor.description], row, strict=True))
