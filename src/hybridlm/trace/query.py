"""`hybridlm query DB "SQL" [--json | --csv]`: run one read-only SQL statement on a trace database
and print its result.

    columns, rows = run_query("trace.duckdb", "SELECT source, count(*) FROM events GROUP BY 1")
    print(format_table(columns, rows))   # for people; format_json / format_csv for scripts

A SQL error (syntax, unknown column, a write statement, several statements) is a `TraceError`
carrying DuckDB's own message, so the command line can print it instead of a traceback.

One statement per query: the result is one table, and `--json` / `--csv` must print exactly one
result a script can parse. Several statements are refused by name rather than silently showing
only the last one's result. The file is opened read-only (never created); statements that write
(INSERT, CREATE, ATTACH, ...) or that write files (COPY ... TO, which could even overwrite the
trace file itself) are refused before anything runs.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

import duckdb
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import open_readonly

# Statements that only read (SHOW, DESCRIBE, SUMMARIZE, FROM ... and VALUES parse as SELECT). The
# connection is read-only anyway, except when this process itself has the file open in a
# TraceStore and the query goes through that store's connection. COPY is left out: COPY ... TO
# writes a file (any file, the trace itself included) even on a read-only connection.
_READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL"}


def _statement_name(kind: str) -> str:
    """duckdb's StatementType as a user reads it: 'an ATTACH statement'; LOAD covers INSTALL too."""
    name = "an INSTALL or LOAD" if kind == "LOAD" else f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind}"
    return f"{name} statement"


def run_query(db_path: str | os.PathLike, sql: str) -> tuple[list[str], list[tuple]]:
    """Run `sql` on the trace database read-only; (column names, rows) of its last statement."""
    con = open_readonly(db_path)
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as e:
            raise TraceError(f"query failed: {e}") from None
        if not statements:
            raise TraceError("query failed: no SQL statement given")
        kinds = [statement.type.name for statement in statements]
        if len(statements) > 1:
            raise TraceError(
                f"query failed: got {len(statements)} statements ({', '.join(kinds)}); give one statement per "
                "query (one result table, so that --json / --csv print one result)"
            )
        if kinds[0] not in _READ_STATEMENTS:
            hint = "; print with --csv or --json and redirect instead" if kinds[0] == "COPY" else ""
            raise TraceError(f"query failed: queries are read-only; this is {_statement_name(kinds[0])}{hint}")
        try:
            con.execute(sql)
            columns = [d[0] for d in con.description or []]
            rows = con.fetchall() if columns else []
        except duckdb.Error as e:
            raise TraceError(f"query failed: {e}") from None
    finally:
        con.close()
    return columns, rows


def format_value(value: Any) -> str:
    """A cell: integers as they are, floats rounded to what a duration needs, NULL spelled out."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | decimal.Decimal):
        x = float(value)
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        magnitude = abs(x)
        if magnitude >= 1e6:
            return f"{x:,.0f}"
        if magnitude >= 100:
            return f"{x:,.1f}"
        if magnitude >= 1:
            return f"{x:.3f}"
        return f"{x:.4g}"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return _visible(str(value))


# Control characters (ESC, CR, BEL, ...) in a cell would drive the user's terminal: a trace file can
# hold any kernel or range name. The table shows them escaped (\x1b); --json and --csv keep them.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


def _visible(text: str) -> str:
    return text.translate(_CONTROL)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The result as a text table; never truncates or wraps a cell, numbers right-aligned.

    Cells and headers are printed literally: '[bold]' or '[/]' in a value is text, not rich markup."""
    cells = [[format_value(v) for v in row] for row in rows]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    for j, name in enumerate(columns):
        numeric = any(_is_number(row[j]) for row in rows) and all(row[j] is None or _is_number(row[j]) for row in rows)
        table.add_column(
            Text(_visible(str(name))), justify="right" if numeric else "left", no_wrap=True, overflow="fold"
        )
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    widths = [max([len(_visible(str(name)))] + [len(row[j]) for row in cells]) for j, name in enumerate(columns)]
    # As wide as the widest row needs: a long kernel name makes a long line, never a cut one.
    width = sum(widths) + 3 * len(widths) + 4
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, force_terminal=False, color_system=None, highlight=False, markup=False, emoji=False
    )
    console.print(table)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    lines.append(f"({len(rows)} row{'s' * (len(rows) != 1)})")
    return "\n".join(lines)


def _plain_value(value: Any) -> Any:
    """A cell as a JSON value: numbers and strings as they are, NaN / infinity as null, dates in
    ISO 8601, DuckDB lists and structs as arrays and objects."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | decimal.Decimal):
        x = float(value)
        return x if math.isfinite(x) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_value(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _distinct_columns(columns: Sequence[str]) -> None:
    seen: set[str] = set()
    repeated = [c for c in columns if c in seen or seen.add(c)]
    if repeated:
        raise TraceError(
            f"query result has repeated column names {sorted(set(repeated))}; name each column once "
            "(SELECT ... AS name) so that every row object keeps every value"
        )


def format_json(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The result as a JSON list of row objects {column: value} (see `_plain_value` for the types)."""
    _distinct_columns(columns)
    objects = [{name: _plain_value(v) for name, v in zip(columns, row, strict=True)} for row in rows]
    return json.dumps(objects, indent=2, ensure_ascii=False, allow_nan=False)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""  # NULL: an empty field
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # every digit: a script reads back the stored double
    plain = _plain_value(value)
    if isinstance(plain, dict | list):
        return json.dumps(plain, ensure_ascii=False)
    return str(plain)


def format_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The result as RFC 4180 CSV: a header row, CRLF line ends, fields quoted where needed.

    NULL is an empty field; floats keep every digit; lists and structs are JSON text."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([str(c) for c in columns])
    for row in rows:
        writer.writerow([_csv_value(v) for v in row])
    return buffer.getvalue()
