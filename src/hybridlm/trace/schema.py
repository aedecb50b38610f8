"""The trace database schema: the one place that names the tables and their columns.

Everything that writes (`TraceStore`, the importers, the recorder) or reads (analysis, reports,
`hybridlm query`) the trace database takes its column lists from here.

Three tables, several runs per file told apart by `run_id`:

- `runs`: one row per recorded or imported run (config, device, software versions), and `ended_at`
  once the run is complete: a run killed (SIGKILL, Ctrl-C) before its end keeps NULL there.
- `events`: one row per timed call. `source` says what kind of call it is:
  'layer' for a block call recorded by hybridlm, 'cpu' for a CPU operator, 'cuda' for a GPU kernel,
  'nvtx' / 'annotation' for user ranges, 'memcpy' / 'memset', 'runtime' for CUDA runtime calls, or
  an importer's own source names (Ingero's 'host', 'driver', ...). Times are microseconds.
- `routing`: tokens each expert received, per (step, phase, layer).

The columns after `tid` in `events` are optional extras that importers fill where the trace has
them; a writer that only knows the base columns leaves them NULL.
"""

from __future__ import annotations

from hybridlm.blocks import LAYER_TYPES as BLOCK_LAYER_TYPES

# Layer types in events.layer_type: every block's (from the block registry, in its order), then
# the two that only kernels have: 'moe_a2a' (MoE all-to-all dispatch / combine) and 'comm' (other
# collectives), written by the importers; then the parts of an MoE block whose experts are spread
# over ranks (hybridlm.distributed), each recorded per rank.
KERNEL_ONLY_LAYER_TYPES = ("moe_a2a", "comm")
EXPERT_PARALLEL_LAYER_TYPES = ("moe_router", "moe_dispatch", "moe_experts", "moe_combine")
LAYER_TYPES: tuple[str, ...] = (*BLOCK_LAYER_TYPES, *KERNEL_ONLY_LAYER_TYPES, *EXPERT_PARALLEL_LAYER_TYPES)
PHASES = ("prefill", "decode", "train")
RUN_KINDS = ("recorded", "imported")


class TraceError(ValueError):
    """A trace file or query that cannot be used; the message names the file and what was expected."""


RUN_COLUMNS: tuple[str, ...] = (
    "run_id",
    "created_at",
    "kind",
    "model",
    "device",
    "config_json",
    "software_json",
    "command",
    "source_file",
    "notes",
    "ended_at",
)

# The base event columns, in the order `TraceStore.add_events` rows use (after run_id).
EVENT_BASE_COLUMNS: tuple[str, ...] = (
    "run_id",
    "source",
    "name",
    "layer",
    "layer_type",
    "phase",
    "step",
    "start_us",
    "duration_us",
    "batch",
    "tokens",
    "rank",
    "stream",
    "pid",
    "tid",
)
# Nullable extras, filled by importers where the trace has them:
#   device_id    GPU index the kernel/copy ran on
#   correlation  CUPTI correlation id linking a runtime call to the kernel it launched
#   range_name   innermost enclosing user range (NVTX push/pop, record_function) of the call
#   bytes        bytes moved by a memcpy/memset (or allocated, for Ingero allocation ops)
#   layer_rule   which rule gave layer_type (classify.RULES): 'block range', 'enclosing range name',
#                'own name'; NULL for hybridlm's own block calls and for events no rule attributed
EVENT_EXTRA_COLUMNS: tuple[str, ...] = ("device_id", "correlation", "range_name", "bytes", "layer_rule")
EVENT_COLUMNS: tuple[str, ...] = EVENT_BASE_COLUMNS + EVENT_EXTRA_COLUMNS
# What one row passed to `TraceStore.add_events` holds: EVENT_COLUMNS without run_id. Rows may stop
# after `tid` (the extras are then NULL).
EVENT_ROW_COLUMNS: tuple[str, ...] = EVENT_COLUMNS[1:]
EVENT_ROW_BASE_LEN = len(EVENT_BASE_COLUMNS) - 1

# rank: the rank whose router chose (experts spread over ranks: each rank routes its own tokens); NULL
# in files written before it was added, and may be left out of a row (0 for one process)
ROUTING_COLUMNS: tuple[str, ...] = ("run_id", "step", "phase", "layer", "expert", "tokens", "dropped", "rank")
ROUTING_ROW_COLUMNS: tuple[str, ...] = ROUTING_COLUMNS[1:]

# DuckDB type of every column, used for the DDL and for typed Arrow batches.
COLUMN_TYPES: dict[str, dict[str, str]] = {
    "runs": {
        "run_id": "VARCHAR PRIMARY KEY",
        "created_at": "TIMESTAMP",
        "kind": "VARCHAR",
        "model": "VARCHAR",
        "device": "VARCHAR",
        "config_json": "VARCHAR",
        "software_json": "VARCHAR",
        "command": "VARCHAR",
        "source_file": "VARCHAR",
        "notes": "VARCHAR",
        "ended_at": "TIMESTAMP",
    },
    "events": {
        "run_id": "VARCHAR",
        "source": "VARCHAR",
        "name": "VARCHAR",
        "layer": "INTEGER",
        "layer_type": "VARCHAR",
        "phase": "VARCHAR",
        "step": "INTEGER",
        "start_us": "DOUBLE",
        "duration_us": "DOUBLE",
        "batch": "INTEGER",
        "tokens": "INTEGER",
        "rank": "INTEGER",
        "stream": "INTEGER",
        "pid": "INTEGER",
        "tid": "INTEGER",
        "device_id": "INTEGER",
        "correlation": "BIGINT",
        "range_name": "VARCHAR",
        "bytes": "BIGINT",
        "layer_rule": "VARCHAR",
    },
    "routing": {
        "run_id": "VARCHAR",
        "step": "INTEGER",
        "phase": "VARCHAR",
        "layer": "INTEGER",
        "expert": "INTEGER",
        "tokens": "INTEGER",
        "dropped": "INTEGER",
        "rank": "INTEGER",
    },
}
TABLES: tuple[str, ...] = ("runs", "events", "routing")
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": RUN_COLUMNS,
    "events": EVENT_COLUMNS,
    "routing": ROUTING_COLUMNS,
}


def create_table_sql(table: str) -> str:
    columns = ",\n    ".join(f"{name} {sql_type}" for name, sql_type in COLUMN_TYPES[table].items())
    return f"CREATE TABLE IF NOT EXISTS {table} (\n    {columns}\n)"


# Run in order on a fresh or existing file; every statement is idempotent.
DDL: tuple[str, ...] = tuple(create_table_sql(t) for t in TABLES)
