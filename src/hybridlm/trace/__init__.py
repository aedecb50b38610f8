"""Per-layer-type tracing: record block calls (Tracer), store them in DuckDB (TraceStore), import
profiler traces (Kineto JSON, Nsight Systems SQLite, Ingero SQLite), query and report."""

from hybridlm.trace.classify import classify_kernel
from hybridlm.trace.importers import detect_format, import_trace
from hybridlm.trace.query import format_csv, format_json, format_table, run_query
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import TraceStore, open_readonly

__all__ = [
    "TraceError",
    "TraceStore",
    "Tracer",
    "classify_kernel",
    "detect_format",
    "format_csv",
    "format_json",
    "format_table",
    "import_trace",
    "open_readonly",
    "run_query",
]
