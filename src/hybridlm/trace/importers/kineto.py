"""Kineto (torch.profiler) Chrome trace JSON -> events.

Reads complete events (`"ph": "X"`; times already in µs) by category:

| cat | source |
|---|---|
| kernel | cuda |
| gpu_memcpy / gpu_memset | memcpy / memset |
| cpu_op (operator) | cpu |
| cuda_runtime / cuda_driver | runtime |
| user_annotation (record_function) | annotation |
| gpu_user_annotation (its GPU-stream shadow) | gpu_annotation |
| python_function | python |
| anything else but the profiler's own `Trace` span | the category, lower-cased |

Attribution of a GPU kernel (or copy) to a hybridlm block, first that applies:
1. its launch: the runtime call with the same `args.correlation`, on a CPU thread, sits inside a
   `L{i}.{type}` record_function range on that thread (innermost wins);
2. the `L{i}.{type}` gpu_user_annotation range enclosing the kernel on the same GPU stream;
3. the name of the innermost record_function range around its launch (else around the kernel on
   its stream), then its own name (`classify.attribute_by_name`; layer type only).
CPU events take the innermost `L{i}.{type}` range around them on their thread, else the same name
rules. `layer_rule` records which rule decided. `step` (and `phase`) come from the enclosing
step range (`ProfilerStep#N`, or `hybridlm.step{N}.{phase}`: see `classify.parse_step_range`),
`range_name` is the innermost enclosing record_function range, `rank` is `distributedInfo.rank`
(0 when the trace has none: a process without a process group).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridlm.trace.classify import parse_block_range, parse_step_range
from hybridlm.trace.importers import (
    attribute_by_timeline,
    attribute_layers,
    finish_import,
    int32_or_none,
    run_for_import,
)
from hybridlm.trace.schema import TraceError

if TYPE_CHECKING:
    from hybridlm.trace.store import TraceStore

_SOURCES = {
    "kernel": "cuda",
    "gpu_memcpy": "memcpy",
    "gpu_memset": "memset",
    "memcpy": "memcpy",  # older Kineto spelled the GPU categories "Memcpy", "Memset", "Kernel"
    "memset": "memset",
    "cpu_op": "cpu",
    "operator": "cpu",
    "cuda_runtime": "runtime",
    "cuda_driver": "runtime",
    "runtime": "runtime",
    "user_annotation": "annotation",
    "gpu_user_annotation": "gpu_annotation",
    "python_function": "python",
}
_GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset", "gpu_user_annotation"}
_LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver", "runtime"}
_SKIPPED_CATEGORIES = {"trace"}  # the profiler's own span over the whole trace


def load_chrome_trace(path: str | os.PathLike) -> dict[str, Any]:
    """The trace as a dict with 'traceEvents' (a bare event list is wrapped); TraceError if unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw.startswith(b"\x1f\x8b"):
            raw = gzip.decompress(raw)
        trace = json.loads(raw)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(
            f"{path}: not a readable Kineto / Chrome trace JSON ({type(e).__name__}: {e}); "
            "expected the file torch.profiler's export_chrome_trace writes (.json or .json.gz)"
        ) from None
    if isinstance(trace, list):
        trace = {"traceEvents": trace}
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise TraceError(
            f"{path}: JSON without a 'traceEvents' list; expected a Kineto / Chrome trace "
            "from torch.profiler's export_chrome_trace"
        )
    return trace


def import_kineto(
    path: str | os.PathLike, store: TraceStore, *, command: str | None = None, run_id: str | None = None
) -> str:
    """Import a torch.profiler Chrome trace (.json / .json.gz) as a new run; returns its run_id."""
    trace = load_chrome_trace(path)
    events = []
    skipped: dict[str, int] = {}
    for e in trace["traceEvents"]:
        if not isinstance(e, dict):
            continue
        cat = str(e.get("cat") or "").lower()
        if e.get("ph") != "X" or cat in _SKIPPED_CATEGORIES or "ts" not in e:
            key = f"ph={e.get('ph')}" if e.get("ph") != "X" else f"cat={cat}"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        events.append(e)
    n = len(events)

    names = [str(e.get("name", "")) for e in events]
    cats = [str(e.get("cat") or "").lower() for e in events]
    args = [e.get("args") if isinstance(e.get("args"), dict) else {} for e in events]
    starts = [float(e["ts"]) for e in events]
    ends = [s + float(e.get("dur") or 0.0) for s, e in zip(starts, events, strict=True)]
    timelines = [(str(e.get("pid")), str(e.get("tid"))) for e in events]
    is_gpu = [c in _GPU_CATEGORIES for c in cats]
    # Whole-µs timestamps (older Kineto) round a child's end past its parent's by up to 1 µs.
    tolerance = 1.0 if all(s.is_integer() for s in starts) else 0.0

    cpu = [i for i in range(n) if not is_gpu[i]]
    gpu = [i for i in range(n) if is_gpu[i]]

    def ranges_where(indices, value_of):
        found = [(i, value_of(i)) for i in indices]
        return [(i, v) for i, v in found if v is not None]

    def attribute(indices, range_pairs):
        """Innermost enclosing range value for each event in indices (same timeline)."""
        position = {i: k for k, (i, _) in enumerate(range_pairs)}
        return attribute_by_timeline(
            [timelines[i] for i, _ in range_pairs],
            [(starts[i], ends[i], v) for i, v in range_pairs],
            [timelines[i] for i in indices],
            [(starts[i], ends[i]) for i in indices],
            tolerance_us=tolerance,
            self_range=lambda q: position.get(indices[q], -1),
        )

    block_of = [parse_block_range(name) for name in names]
    step_of = [parse_step_range(name) for name in names]
    # CPU side: block ranges (any CPU event named L{i}.{type}), record_function ranges, steps.
    cpu_blocks = ranges_where(cpu, lambda i: block_of[i])
    cpu_annotations = ranges_where(
        cpu,
        lambda i: names[i] if cats[i] == "user_annotation" and step_of[i] is None else None,
    )
    cpu_steps = ranges_where(cpu, lambda i: step_of[i])
    gpu_blocks = ranges_where(gpu, lambda i: block_of[i] if cats[i] == "gpu_user_annotation" else None)
    gpu_annotations = ranges_where(gpu, lambda i: names[i] if cats[i] == "gpu_user_annotation" else None)

    block: list[tuple[int, str] | None] = [None] * n
    range_name: list[str | None] = [None] * n
    step_phase: list[tuple[int, str | None] | None] = [None] * n
    for indices, pairs, target in (
        (cpu, cpu_blocks, block),
        (cpu, cpu_annotations, range_name),
        (cpu, cpu_steps, step_phase),
        (gpu, gpu_blocks, block),
        (gpu, gpu_annotations, range_name),
    ):
        for i, value in zip(indices, attribute(indices, pairs), strict=True):
            target[i] = value
    for i in range(n):
        if block_of[i] is not None:  # a block range is its own block
            block[i] = block_of[i]
        if step_of[i] is not None and not is_gpu[i]:  # a step range is its own step
            step_phase[i] = step_of[i]

    # GPU events inherit from the CPU call that launched them, linked by correlation id (or, in
    # traces without runtime events, by the operator's External id).
    launch_by_correlation = {}
    op_by_external_id = {}
    for i in cpu:
        if cats[i] in _LAUNCH_CATEGORIES and args[i].get("correlation") is not None:
            launch_by_correlation[args[i]["correlation"]] = i
        elif cats[i] in ("cpu_op", "operator") and args[i].get("External id") is not None:
            op_by_external_id[args[i]["External id"]] = i
    pid = [int32_or_none(e.get("pid")) for e in events]
    tid = [int32_or_none(e.get("tid")) for e in events]
    device_id: list[int | None] = [None] * n
    stream: list[int | None] = [None] * n
    for i in gpu:
        device_id[i] = int32_or_none(args[i].get("device", events[i].get("pid")))
        stream[i] = int32_or_none(args[i].get("stream", events[i].get("tid")))
        launch = launch_by_correlation.get(args[i].get("correlation"))
        if launch is None:
            launch = op_by_external_id.get(args[i].get("External id"))
        if launch is not None:
            if block[launch] is not None:
                block[i] = block[launch]
            range_name[i] = range_name[launch] or range_name[i]
            step_phase[i] = step_phase[launch]
            pid[i], tid[i] = pid[launch], tid[launch]
        else:
            pid[i] = tid[i] = None  # a GPU event's pid/tid are the device and stream

    layers = attribute_layers(block, names, range_name)
    rank = int32_or_none((trace.get("distributedInfo") or {}).get("rank"))
    device_names = sorted(
        {str(d.get("name")) for d in trace.get("deviceProperties") or [] if isinstance(d, dict) and d.get("name")}
    )
    config = {
        "format": "kineto",
        "schemaVersion": trace.get("schemaVersion"),
        "distributedInfo": trace.get("distributedInfo"),
        "baseTimeNanoseconds": trace.get("baseTimeNanoseconds"),
        "skipped_events": skipped,
    }
    into_existing_run = run_id is not None
    run_id = run_for_import(
        store,
        run_id,
        device=", ".join(device_names) or None,
        config=config,
        command=command,
        source_file=str(Path(path).resolve()),
        notes="start_us is the trace's own ts (µs); kernels take pid/tid of the launching thread",
    )
    store.add_event_columns(
        run_id,
        {
            "source": [_SOURCES.get(c, c or "other") for c in cats],
            "name": names,
            **layers,
            "phase": [sp[1] if sp else None for sp in step_phase],
            "step": [sp[0] if sp else None for sp in step_phase],
            "start_us": starts,
            "duration_us": [e - s for s, e in zip(starts, ends, strict=True)],
            "rank": [0 if rank is None else rank] * n,
            "stream": stream,
            "pid": pid,
            "tid": tid,
            "device_id": device_id,
            "correlation": [_int64_or_none(a.get("correlation")) for a in args],
            "range_name": range_name,
            "bytes": [_int64_or_none(a.get("bytes")) if is_gpu[i] else None for i, a in enumerate(args)],
        },
    )
    finish_import(store, run_id, into_existing_run=into_existing_run)
    return run_id


def _int64_or_none(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return None
