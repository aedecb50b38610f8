"""Importers: foreign traces -> rows of the trace database (one imported run per file).

`import_trace(path, store)` looks at the file's content and dispatches:

| kind | file | importer |
|---|---|---|
| Kineto | torch.profiler Chrome trace JSON, plain or gzipped (.json, .json.gz) | `kineto.import_kineto` |
| Nsight | Nsight Systems SQLite export (CUPTI_ACTIVITY_KIND_KERNEL, StringIds, ...) | `nsight.import_nsight` |
| Ingero | Ingero eBPF trace SQLite (events + sources + ops) | `ingero.import_ingero` |

Every importer attributes what it can to hybridlm's block ranges (`L{index}.{layer_type}`, see
`classify.parse_block_range`), then to the name of the range around an event or its launch, then
to the event's own name (`attribute_layers`; the rules are in classify.py), and stores which rule
said so in `layer_rule`.
The helpers below are shared by the three importers.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hybridlm.trace.classify import RULE_BLOCK_RANGE, attribute_by_name
from hybridlm.trace.schema import TraceError

if TYPE_CHECKING:
    from hybridlm.trace.store import TraceStore

ACCEPTED = (
    "a Kineto / torch.profiler Chrome trace (.json or .json.gz), "
    "an Nsight Systems SQLite export (tables CUPTI_ACTIVITY_KIND_KERNEL, StringIds, ...), "
    "or an Ingero SQLite trace (tables events, sources, ops)"
)

_INT32 = 2**31 - 1
T = TypeVar("T")


def detect_format(path: str | os.PathLike) -> str:
    """'kineto', 'nsight' or 'ingero' from the file's content; TraceError for anything else."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file; expected {ACCEPTED}")
    if not path.is_file():
        raise TraceError(f"{path}: is not a file; expected {ACCEPTED}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"\x1f\x8b"):  # gzip: a compressed Chrome trace
        return "kineto"
    if head.startswith(b"SQLite format 3\x00"):
        tables = sqlite_tables(path)
        if "StringIds" in tables and tables.keys() & {
            "CUPTI_ACTIVITY_KIND_KERNEL",
            "CUPTI_ACTIVITY_KIND_RUNTIME",
            "NVTX_EVENTS",
        }:
            return "nsight"
        if {"events", "sources", "ops"} <= tables.keys():
            return "ingero"
        shown = ", ".join(sorted(tables)[:12]) or "no tables"
        raise TraceError(f"{path}: is a SQLite file of an unknown kind (tables: {shown}); expected {ACCEPTED}")
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        return "kineto"
    raise TraceError(f"{path}: is not a trace file this version can read; expected {ACCEPTED}")


def import_trace(
    path: str | os.PathLike, store: TraceStore, *, command: str | None = None, run_id: str | None = None
) -> str:
    """Import a Kineto JSON, Nsight SQLite or Ingero SQLite trace; returns the run_id.

    A new `imported` run by default; with `run_id`, the events join that existing run (a recorded
    run whose kernels were profiled alongside, say) and no runs row is written.
    """
    kind = detect_format(path)
    if kind == "kineto":
        from hybridlm.trace.importers.kineto import import_kineto as importer
    elif kind == "nsight":
        from hybridlm.trace.importers.nsight import import_nsight as importer
    else:
        from hybridlm.trace.importers.ingero import import_ingero as importer
    return importer(path, store, command=command, run_id=run_id)


# -- shared helpers ----------------------------------------------------------------------------------


def run_for_import(store: TraceStore, run_id: str | None, **run_info: Any) -> str:
    """`run_id` if that run exists in the store (TraceError if not), else a new imported run."""
    if run_id is None:
        return store.new_run(kind="imported", **run_info)
    found = store.connection.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()
    if found[0][0] == 0:
        raise TraceError(f"{store.path}: has no run {run_id!r} to import into")
    return run_id


def finish_import(store: TraceStore, run_id: str, *, into_existing_run: bool) -> None:
    """Flush the imported events; a run the import created is then marked complete (an import
    killed half-way leaves an incomplete run). A run imported into is left for its owner to end."""
    if into_existing_run:
        store.flush()
    else:
        store.end_run(run_id)


def import_sqlite(path: str | os.PathLike, kind: str, read: Callable[[sqlite3.Connection, Path], str]) -> str:
    """Open ``path`` read-only, run ``read(con, path)``, close; SQLite errors become one TraceError."""
    con = open_sqlite(path)
    try:
        return read(con, Path(path))
    except sqlite3.DatabaseError as e:
        raise TraceError(f"{path}: unreadable {kind} ({e}); expected {ACCEPTED}") from None
    finally:
        con.close()


def open_sqlite(path: str | os.PathLike) -> sqlite3.Connection:
    """Open a SQLite file read-only (also from a read-only folder); TraceError if it is not SQLite.

    A WAL-mode file with no write-ahead log beside it (a finished trace: nobody is writing it) is
    opened immutable, because a plain read-only open of a WAL-mode file creates `-wal` / `-shm`
    side files next to the user's trace, and fails in a read-only folder."""
    path = Path(path)
    uri = path.resolve().as_uri()
    modes = ["mode=ro", "mode=ro&immutable=1"]
    if _is_wal_mode(path) and not path.with_name(path.name + "-wal").exists():
        modes.reverse()
    error: sqlite3.DatabaseError | None = None
    for mode in modes:
        try:
            con = sqlite3.connect(f"{uri}?{mode}", uri=True)
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
            return con
        except sqlite3.DatabaseError as e:
            error = e
    raise TraceError(f"{path}: cannot read as SQLite ({error}); expected {ACCEPTED}") from None


def _is_wal_mode(path: Path) -> bool:
    """SQLite's header bytes 18 and 19 (file format read / write versions) are 2 in WAL mode."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"


def sqlite_tables(path_or_con: str | os.PathLike | sqlite3.Connection) -> dict[str, list[str]]:
    """{table name: column names} of a SQLite file, read from sqlite_master / PRAGMA table_info."""
    con = path_or_con if isinstance(path_or_con, sqlite3.Connection) else open_sqlite(path_or_con)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: [r[1] for r in con.execute(f'PRAGMA table_info("{name}")')] for name in names}
    except sqlite3.DatabaseError as e:
        raise TraceError(f"cannot read the tables of a SQLite file: {e}") from None
    finally:
        if con is not path_or_con:
            con.close()


def int32_or_none(value: Any) -> int | None:
    """An INTEGER column value: ints (and digit strings) within int32, else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit():
            return None
        value = int(value)
    if isinstance(value, int) and -_INT32 - 1 <= value <= _INT32:
        return value
    return None


def innermost_enclosing(
    ranges: Sequence[tuple[float, float, T]],
    queries: Sequence[tuple[float, float]],
    *,
    tolerance_us: float = 0.0,
    exclude_self: Sequence[int] | None = None,
) -> list[T | None]:
    """For each query interval (start, end), the value of the innermost range enclosing it.

    One timeline (one CPU thread, or one GPU stream). `tolerance_us` lets a child end that much
    after its parent (traces with whole-µs timestamps round both ends independently).
    `exclude_self[i] = j` means query i is range j itself, which must not enclose itself.
    Sweep over starts with a stack of open ranges: O((R + Q) log(R + Q)).
    """
    # Sort key: start, longest first, then file order; at a tie a query goes before a range so
    # that a range is never its own parent, and an outer range is pushed before an inner one.
    items: list[tuple[float, float, int, int, int]] = []
    for j, (start, end, _) in enumerate(ranges):
        items.append((start, -end, j, 1, j))
    for i, (start, end) in enumerate(queries):
        order = exclude_self[i] if exclude_self is not None and exclude_self[i] >= 0 else len(ranges) + i
        items.append((start, -end, order, 0, i))
    items.sort()
    result: list[T | None] = [None] * len(queries)
    stack: list[int] = []  # indices into ranges
    for start, neg_end, _, is_range, index in items:
        end = -neg_end
        while stack and ranges[stack[-1]][1] + tolerance_us < start:
            stack.pop()
        if is_range:
            stack.append(index)
            continue
        for j in reversed(stack):
            if ranges[j][1] + tolerance_us >= end:
                result[index] = ranges[j][2]
                break
    return result


def attribute_layers(
    blocks: Sequence[tuple[int, str] | None], names: Sequence[str | None], range_names: Sequence[str | None]
) -> dict[str, list]:
    """The `layer`, `layer_type` and `layer_rule` columns of imported events: an event's block range
    (`L{i}.{type}` around it or around its launch) first, else `classify.attribute_by_name` (the
    enclosing range's name, then its own name). See classify.py for the rules."""
    layer: list[int | None] = []
    layer_type: list[str | None] = []
    rule: list[str | None] = []
    for block, name, range_name in zip(blocks, names, range_names, strict=True):
        if block is not None:
            layer.append(block[0])
            layer_type.append(block[1])
            rule.append(RULE_BLOCK_RANGE)
        else:
            found, how = attribute_by_name(name, range_name)
            layer.append(None)
            layer_type.append(found)
            rule.append(how)
    return {"layer": layer, "layer_type": layer_type, "layer_rule": rule}


def group_by(keys: Sequence[T], indices: Sequence[int] | None = None) -> dict[T, list[int]]:
    """{key: [positions]} for the positions (all by default) of a key list."""
    groups: dict[T, list[int]] = {}
    for i in range(len(keys)) if indices is None else indices:
        groups.setdefault(keys[i], []).append(i)
    return groups


def attribute_by_timeline(
    timeline_of_range: Sequence[Any],
    ranges: Sequence[tuple[float, float, T]],
    timeline_of_query: Sequence[Any],
    queries: Sequence[tuple[float, float]],
    *,
    tolerance_us: float = 0.0,
    self_range: Callable[[int], int] | None = None,
) -> list[T | None]:
    """`innermost_enclosing` run separately on each timeline (thread or stream key)."""
    result: list[T | None] = [None] * len(queries)
    range_groups = group_by(timeline_of_range)
    for key, query_positions in group_by(timeline_of_query).items():
        range_positions = range_groups.get(key)
        if not range_positions:
            continue
        local = {global_j: local_j for local_j, global_j in enumerate(range_positions)}
        exclude = None
        if self_range is not None:
            exclude = [local.get(self_range(i), -1) for i in query_positions]
        found = innermost_enclosing(
            [ranges[j] for j in range_positions],
            [queries[i] for i in query_positions],
            tolerance_us=tolerance_us,
            exclude_self=exclude,
        )
        for i, value in zip(query_positions, found, strict=True):
            result[i] = value
    return result
