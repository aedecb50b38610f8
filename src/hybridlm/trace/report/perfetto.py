"""The report as a Chrome / Perfetto trace (JSON trace events): a track per layer type, a track of
steps, one complete event per call; opens in ui.perfetto.dev and chrome://tracing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from hybridlm.trace import analysis
from hybridlm.trace.analysis import OTHER
from hybridlm.trace.report.formats import write_staged

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

    lanes = sorted({lane(r) for r in rows}, key=lambda k: (k[0] != "", analysis.type_key(k[0]), str(k[1])))
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

    def write(staging: Path) -> None:
        with open(staging, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"run_id": run_id}}, f)

    return write_staged(path, write)
