"""`hybridlm query DB "SQL"`: run read-only SQL on a trace database and render the result.

    columns, rows = run_query("trace.duckdb", "SELECT source, count(*) FROM events GROUP BY 1")
    print(format_table(columns, rows))

A SQL error (syntax, unknown column, a write statement) is a `TraceError` carrying DuckDB's own
message, so the command line can print it instead of a traceback.
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import duckdb
from rich import box
from rich.console import Console
from rich.table import Table

from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import open_readonly

# Statements that only read. The connection is read-only anyway, except when this process itself
# has the file open in a TraceStore and the query goes through that store's connection.
_READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "COPY", "SET", "VARIABLE_SET"}


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
        for statement in statements:
            kind = statement.type.name
            if kind not in _READ_STATEMENTS:
                raise TraceError(f"query failed: queries are read-only; got a {kind} statement")
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
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The result as a text table; never truncates or wraps a cell, numbers right-aligned."""
    cells = [[format_value(v) for v in row] for row in rows]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    for j, name in enumerate(columns):
        numeric = any(_is_number(row[j]) for row in rows) and all(row[j] is None or _is_number(row[j]) for row in rows)
        table.add_column(str(name), justify="right" if numeric else "left", no_wrap=True, overflow="fold")
    for row in cells:
        table.add_row(*row)
    widths = [max([len(str(name))] + [len(row[j]) for row in cells]) for j, name in enumerate(columns)]
    # As wide as the widest row needs: a long kernel name makes a long line, never a cut one.
    width = sum(widths) + 3 * len(widths) + 4
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False).print(table)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    lines.append(f"({len(rows)} row{'s' * (len(rows) != 1)})")
    return "\n".join(lines)
