"""Nsight Systems SQLite export (`nsys export --type sqlite`) -> events.

Table and column names differ between Nsight versions, so every table and column is looked up
(sqlite_master, PRAGMA table_info) and a missing one is skipped, never assumed:

| table | source | name |
|---|---|---|
| CUPTI_ACTIVITY_KIND_KERNEL | cuda | demangledName (else shortName, mangledName) via StringIds |
| CUPTI_ACTIVITY_KIND_MEMCPY | memcpy | 'memcpy HtoD', ... from copyKind |
| CUPTI_ACTIVITY_KIND_MEMSET | memset | 'memset' |
| CUPTI_ACTIVITY_KIND_RUNTIME | runtime | nameId via StringIds (e.g. cudaLaunchKernel) |
| NVTX_EVENTS (push/pop and start/end ranges) | nvtx | text, or textId via StringIds |

Kernel names are the demangled ones, as Kineto writes them, so a kernel has one name whichever
profiler saw it. Times are ns since the session start, stored as µs. `pid` is decoded from
globalPid / globalTid (bits 24..47, as nsys packs them), `tid` from globalTid (bits 0..23).

Quirk seen in real exports (Nsight 2022.2): a runtime call can appear twice with one
correlationId, the API (`cudaMalloc`) and, nested inside it, its versioned entry point
(`cudaMalloc_v3020`). Only the outer row is kept, or every runtime call would be counted twice.

Attribution: a kernel or copy links to the runtime call that launched it (correlationId); the
innermost NVTX push/pop range around that call on the same thread gives `range_name`, an
`L{i}.{type}` range (record_function under torch's emit_nvtx) gives layer and layer_type, and a
step range (`classify.parse_step_range`) gives step and phase. Without a block range the layer
type comes from the enclosing range's name, then the kernel's own name (`classify.py`), and
`layer_rule` says which. `rank` comes from an NVTX thread name like
'MPI Rank 3' (nsys --trace=mpi writes it) for that process, else 0.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridlm.trace.classify import parse_block_range, parse_step_range
from hybridlm.trace.importers import (
    ACCEPTED,
    attribute_by_timeline,
    attribute_layers,
    finish_import,
    import_sqlite,
    run_for_import,
    sqlite_tables,
)
from hybridlm.trace.schema import TraceError

if TYPE_CHECKING:
    from hybridlm.trace.store import TraceStore

# CUpti_ActivityMemcpyKind (cupti_activity.h).
_COPY_KINDS = {
    0: "unknown",
    1: "HtoD",
    2: "DtoH",
    3: "HtoA",
    4: "AtoH",
    5: "AtoA",
    6: "AtoD",
    7: "DtoA",
    8: "DtoD",
    9: "HtoH",
    10: "PtoP",
}
# NvtxEventType values in NVTX_EVENTS.eventType.
_NVTX_RANGES = (59, 60)  # push/pop, start/end
_NVTX_THREAD_NAME = 39
_RANK_HINT = re.compile(r"\brank\s*[#:=]?\s*(\d+)", re.IGNORECASE)
_KERNEL_NAME_COLUMNS = ("demangledName", "shortName", "mangledName", "name")


def _pid(global_id: int | None) -> int | None:
    return None if global_id is None else (global_id >> 24) & 0xFFFFFF


def _tid(global_tid: int | None) -> int | None:
    return None if global_tid is None else global_tid & 0xFFFFFF


class _Columns:
    """Column-wise event rows, appended one event at a time."""

    NAMES = (
        "source",
        "name",
        "start_us",
        "duration_us",
        "stream",
        "pid",
        "tid",
        "device_id",
        "correlation",
        "bytes",
        "global_tid",
    )

    def __init__(self) -> None:
        self.data: dict[str, list] = {name: [] for name in self.NAMES}

    def add(self, **values: Any) -> None:
        for name in self.NAMES:
            self.data[name].append(values.get(name))

    def __len__(self) -> int:
        return len(self.data["source"])


def import_nsight(
    path: str | os.PathLike, store: TraceStore, *, command: str | None = None, run_id: str | None = None
) -> str:
    """Import an Nsight Systems SQLite export as a new run; returns its run_id."""
    return import_sqlite(path, "Nsight SQLite export", lambda con, file: _import(con, file, store, command, run_id))


def _import(con: sqlite3.Connection, path: Path, store: TraceStore, command: str | None, run_id: str | None) -> str:
    tables = sqlite_tables(con)
    if "StringIds" not in tables:
        raise TraceError(f"{path}: Nsight export without a StringIds table; expected {ACCEPTED}")
    strings = dict(con.execute("SELECT id, value FROM StringIds"))

    def text(value: Any) -> str | None:
        return strings.get(value) if isinstance(value, int) else value

    def select(table: str, wanted: list[str]) -> list[tuple] | None:
        """Rows of the wanted columns (NULL for the ones this version lacks), or None if no table."""
        if table not in tables:
            return None
        have = set(tables[table])
        if not {"start", "end"} <= have:
            return None
        exprs = [f'"{c}"' if c in have else "NULL" for c in wanted]
        return con.execute(f'SELECT {", ".join(exprs)} FROM "{table}" ORDER BY "start"').fetchall()

    rows = _Columns()
    counts: dict[str, int] = {}

    # NVTX ranges (push/pop and start/end; marks and thread/domain names are not timed calls).
    nvtx = select("NVTX_EVENTS", ["start", "end", "eventType", "text", "textId", "globalTid"]) or []
    thread_names = [(r[5], text(r[3]) or text(r[4])) for r in nvtx if r[2] == _NVTX_THREAD_NAME]
    for start, end, event_type, txt, text_id, global_tid in nvtx:
        if end is None or (event_type is not None and event_type not in _NVTX_RANGES):
            continue
        rows.add(
            source="nvtx",
            name=text(txt) or text(text_id) or "",
            start_us=start / 1000,
            duration_us=(end - start) / 1000,
            pid=_pid(global_tid),
            tid=_tid(global_tid),
            global_tid=global_tid,
        )
    counts["nvtx"] = len(rows)

    # Runtime calls, keeping the outermost row per (thread, correlationId).
    runtime = select("CUPTI_ACTIVITY_KIND_RUNTIME", ["start", "end", "globalTid", "correlationId", "nameId", "name"])
    # (pid, correlationId) -> row position of the runtime call; ids are unique per process.
    launch_row: dict[tuple[int | None, int], int] = {}
    duplicates = 0
    for start, end, global_tid, correlation, name_id, name in runtime or []:
        key = (_pid(global_tid), correlation)
        seen = launch_row.get(key) if correlation is not None else None
        if seen is not None and rows.data["global_tid"][seen] == global_tid:
            duplicates += 1
            continue
        if correlation is not None:
            launch_row[key] = len(rows)
        rows.add(
            source="runtime",
            name=text(name_id) or text(name) or "",
            start_us=start / 1000,
            duration_us=(end - start) / 1000,
            pid=_pid(global_tid),
            tid=_tid(global_tid),
            correlation=correlation,
            global_tid=global_tid,
        )

    # GPU work: kernels, copies, memsets.
    gpu_columns = ["start", "end", "deviceId", "streamId", "correlationId", "globalPid"]
    kernel_name_columns = [c for c in _KERNEL_NAME_COLUMNS if c in tables.get("CUPTI_ACTIVITY_KIND_KERNEL", [])]
    gpu_tables = (
        ("CUPTI_ACTIVITY_KIND_KERNEL", "cuda", kernel_name_columns),
        ("CUPTI_ACTIVITY_KIND_MEMCPY", "memcpy", ["copyKind", "bytes"]),
        ("CUPTI_ACTIVITY_KIND_MEMSET", "memset", ["bytes"]),
    )
    for table, source, extra in gpu_tables:
        for row in select(table, gpu_columns + extra) or []:
            start, end, device, stream, correlation, global_pid = row[:6]
            if source == "cuda":
                name = next((text(v) for v in row[6:] if text(v)), "")
                size = None
            elif source == "memcpy":
                name = "memcpy " + _COPY_KINDS.get(row[6], str(row[6]))
                size = row[7]
            else:
                name, size = "memset", row[6]
            launch = launch_row.get((_pid(global_pid), correlation))
            rows.add(
                source=source,
                name=name,
                start_us=start / 1000,
                duration_us=(end - start) / 1000,
                stream=stream,
                pid=_pid(global_pid),
                tid=None if launch is None else rows.data["tid"][launch],
                device_id=device,
                correlation=correlation,
                bytes=size,
                global_tid=None if launch is None else rows.data["global_tid"][launch],
            )
            counts[source] = counts.get(source, 0) + 1

    # Attribution: innermost NVTX range around each call on its thread; GPU work by its launch.
    n = len(rows)
    d = rows.data
    on_cpu = [i for i in range(n) if d["source"][i] in ("nvtx", "runtime")]
    nvtx_rows = [i for i in range(n) if d["source"][i] == "nvtx"]
    block_of = [parse_block_range(d["name"][i]) if d["source"][i] == "nvtx" else None for i in range(n)]
    step_of = [parse_step_range(d["name"][i]) if d["source"][i] == "nvtx" else None for i in range(n)]

    def innermost(values: list) -> list:
        pairs = [(i, v) for i, v in zip(nvtx_rows, values, strict=True) if v is not None]
        where = {i: k for k, (i, _) in enumerate(pairs)}
        return attribute_by_timeline(
            [d["global_tid"][i] for i, _ in pairs],
            [(d["start_us"][i], d["start_us"][i] + d["duration_us"][i], v) for i, v in pairs],
            [d["global_tid"][i] for i in on_cpu],
            [(d["start_us"][i], d["start_us"][i] + d["duration_us"][i]) for i in on_cpu],
            self_range=lambda q: where.get(on_cpu[q], -1),
        )

    block: list[tuple[int, str] | None] = [None] * n
    range_name: list[str | None] = [None] * n
    step_phase: list[tuple[int, str | None] | None] = [None] * n
    for i, b, r, sp in zip(
        on_cpu,
        innermost([block_of[i] for i in nvtx_rows]),
        innermost([None if step_of[i] else d["name"][i] for i in nvtx_rows]),
        innermost([step_of[i] for i in nvtx_rows]),
        strict=True,
    ):
        block[i] = block_of[i] or b
        range_name[i] = r
        step_phase[i] = step_of[i] or sp
    for i in range(n):
        if d["source"][i] in ("nvtx", "runtime"):
            continue
        launch = launch_row.get((d["pid"][i], d["correlation"][i]))
        if launch is not None:
            block[i], range_name[i], step_phase[i] = block[launch], range_name[launch], step_phase[launch]

    # Rank per process from thread names like 'MPI Rank 0'.
    rank_of_pid: dict[int | None, int] = {}
    hints = thread_names + [(r[0], text(r[1])) for r in _thread_names(con, tables)]
    for global_tid, name in hints:
        if name and (m := _RANK_HINT.search(name)):
            rank_of_pid.setdefault(_pid(global_tid), int(m.group(1)))

    columns = {name: d[name] for name in _Columns.NAMES if name != "global_tid"}
    columns.update(attribute_layers(block, d["name"], range_name))
    columns["range_name"] = range_name
    columns["step"] = [sp[0] if sp else None for sp in step_phase]
    columns["phase"] = [sp[1] if sp else None for sp in step_phase]
    columns["rank"] = [rank_of_pid.get(p, 0) for p in d["pid"]]

    meta_table = next((t for t in ("EXPORT_META_DATA", "META_DATA_EXPORT") if t in tables), None)
    meta = dict(con.execute(f'SELECT name, value FROM "{meta_table}"').fetchall()) if meta_table else {}
    gpus = select_names(con, tables)
    counts["runtime"] = len(launch_row) if runtime else 0
    into_existing_run = run_id is not None
    run_id = run_for_import(
        store,
        run_id,
        device=", ".join(gpus) or None,
        config={
            "format": "nsight",
            "export": {k: v for k, v in meta.items() if k.startswith(("EXPORT_PRODUCT", "EXPORT_SCHEMA"))},
            "imported_rows": counts,
            "runtime_duplicates_dropped": duplicates,
            "ranks": sorted(set(rank_of_pid.values())),
        },
        command=command,
        source_file=str(path.resolve()),
        notes="start_us is ns since the Nsight session start / 1000",
    )
    store.add_event_columns(run_id, columns)
    finish_import(store, run_id, into_existing_run=into_existing_run)
    return run_id


def _thread_names(con: sqlite3.Connection, tables: dict[str, list[str]]) -> list[tuple]:
    if "ThreadNames" not in tables or not {"nameId", "globalTid"} <= set(tables["ThreadNames"]):
        return []
    return con.execute("SELECT globalTid, nameId FROM ThreadNames").fetchall()


def select_names(con: sqlite3.Connection, tables: dict[str, list[str]]) -> list[str]:
    """GPU model names from TARGET_INFO_GPU, where the export has it."""
    if "TARGET_INFO_GPU" not in tables or "name" not in tables["TARGET_INFO_GPU"]:
        return []
    return sorted({r[0] for r in con.execute('SELECT "name" FROM TARGET_INFO_GPU') if r[0]})
